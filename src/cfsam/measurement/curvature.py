"""Curvature: Hessian-vector products, the top eigenvalue, Hutchinson's trace and SAM sharpness."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cfsam.core.errors import UsageError
from cfsam.measurement.heldout import (
    Batch,
    LossFn,
    eval_mode,
    evaluating,
    mean_loss,
    model_params,
    on_device,
    response_token_loss,
    split_rows,
)

log = logging.getLogger(__name__)

# Examples per double-backward pass. Double backward keeps the whole graph of the gradient (and the
# math attention kernel's score matrices) alive: at 8 x 256 tokens of SmolLM2-135M that peaked at
# 10.7 GB, against 5.7 GB for a SAM training step; two rows at a time bring it under the training
# step's. H v is a sum over examples, so the rows only change the floating-point summation order.
# On an accelerator memory is not what binds but the number of passes (on one H200 with 8 workers a
# power iteration over 32 examples in 2-row passes took 6-8 s): a whole batch a pass there.
HVP_ROWS = 2
HVP_ROWS_ACCELERATOR = 8


def hvp_rows(device: torch.device) -> int:
    return HVP_ROWS if device.type == "cpu" else HVP_ROWS_ACCELERATOR

def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x * y).sum(dtype=torch.float64) for x, y in zip(a, b)))


def gradient(model: torch.nn.Module, batches: Sequence[Batch],
             loss_fn: LossFn = response_token_loss) -> tuple[float, list[torch.Tensor]]:
    """L(theta) and its gradient, one batch at a time (the loss is a sum over batches / item count)."""
    params = model_params(model)
    batches = on_device(batches, params[0].device)
    grad = [torch.zeros_like(p) for p in params]
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            s, n = loss_fn(model, batch)
            g = torch.autograd.grad(s, params, allow_unused=True, materialize_grads=True)
            torch._foreach_add_(grad, g)
            total, count = total + float(s.detach()), count + n
    if count == 0:
        raise UsageError("the batches hold no labelled items (every label is -100); the loss is undefined")
    torch._foreach_div_(grad, count)
    return total / count, grad


def hvp(model: torch.nn.Module, batches: Sequence[Batch], vector: Sequence[torch.Tensor],
        loss_fn: LossFn = response_token_loss) -> list[torch.Tensor]:
    """H v for the Hessian H of L(theta), by double backward, one batch at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = model_params(model)
    batches = on_device(split_rows(batches, hvp_rows(params[0].device)), params[0].device)
    out = [torch.zeros_like(p) for p in params]
    count = 0
    # the fused CPU/GPU attention kernels have no second derivative; the math one has
    with sdpa_kernel([SDPBackend.MATH]), eval_mode(model):
        for batch in batches:
            s, n = loss_fn(model, batch)
            g = torch.autograd.grad(s, params, create_graph=True, allow_unused=True, materialize_grads=True)
            # a gradient that does not depend on the weights (loss linear in them) has no second derivative
            live = [k for k, gk in enumerate(g) if gk.requires_grad]
            hv = torch.autograd.grad([g[k] for k in live], params, grad_outputs=[vector[k] for k in live],
                                     allow_unused=True, materialize_grads=True)
            torch._foreach_add_(out, hv)
            count += n
    torch._foreach_div_(out, count)
    return out


# An estimate whose last power iteration still moved it by more than this (relative) has not converged: it is
# flagged (``hessian_top_eigenvalue_converged: false``) and kept out of correlations (cfsam.analysis). 1 % is
# far below the spread of the estimates over runs (45 to 600 on the cpu study), so a converged one ranks
# right; the H200's 10-iteration estimates of -57 and 5,680 among values near 90 were not.
CONVERGED_TOL = 1e-2


def power_iteration(model: torch.nn.Module, batches: Sequence[Batch], *, iters: int = 20, tol: float = 1e-3,
                    seed: int = 0, loss_fn: LossFn = response_token_loss, converged_tol: float = CONVERGED_TOL) -> dict:
    """The Hessian's dominant eigenvalue (largest in magnitude, sign kept) by power iteration on H v, and how
    far it converged: {"eigenvalue", "iterations", "rel_change", "converged"}.

    Stops when the Rayleigh quotient changes by at most ``tol`` (relative) or after ``iters`` HVPs.
    ``rel_change`` = |q_k - q_{k-1}| / |q_k| at the last iteration k (None after a single one: nothing to
    compare); ``converged``: rel_change <= ``converged_tol``."""
    if iters < 1:
        raise UsageError(f"iters={iters}; power iteration needs at least one step")
    params = model_params(model)
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in params]
    eig, change = None, None
    with eval_mode(model):
        for k in tqdm(range(iters), desc="power iteration", leave=False):
            norm = math.sqrt(_dot(v, v))
            if norm == 0:  # H v = 0: v lies in the null space, and so would every further iterate
                return {"eigenvalue": 0.0, "iterations": k, "rel_change": 0.0, "converged": True}
            torch._foreach_div_(v, norm)
            hv = hvp(model, batches, v, loss_fn)
            new = _dot(v, hv)  # Rayleigh quotient of the unit vector v
            if eig is not None:
                change = abs(new - eig) / abs(new) if new != 0 else (0.0 if eig == 0 else math.inf)
            eig, v = new, hv
            if change is not None and change <= tol:
                break
    out = {"eigenvalue": eig, "iterations": k + 1, "rel_change": change,
           "converged": change is not None and change <= converged_tol}
    if out["converged"]:
        log.info("power iteration: %.6g after %d HVPs (last relative change %.2g)", eig, k + 1, change)
    else:
        log.warning("power iteration stopped after %d HVPs without converging (last relative change %s > %g): "
                    "%.6g is flagged", k + 1, "n/a" if change is None else f"{change:.2g}", converged_tol, eig)
    return out


def hessian_top_eigenvalue(model: torch.nn.Module, batches: Sequence[Batch], *, iters: int = 20,
                           tol: float = 1e-3, seed: int = 0, loss_fn: LossFn = response_token_loss) -> float:
    """The eigenvalue of ``power_iteration``, alone."""
    return power_iteration(model, batches, iters=iters, tol=tol, seed=seed, loss_fn=loss_fn)["eigenvalue"]


def hessian_trace(model: torch.nn.Module, batches: Sequence[Batch], *, probes: int = 10, seed: int = 0,
                  loss_fn: LossFn = response_token_loss) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H), mean of v^T H v over Rademacher probes v, and its standard error."""
    if probes < 2:
        raise UsageError(f"probes={probes}; Hutchinson's estimate with a standard error needs at least 2")
    params = model_params(model)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    with eval_mode(model):
        for _ in tqdm(range(probes), desc="Hutchinson", leave=False):
            v = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
            samples.append(_dot(v, hvp(model, batches, v, loss_fn)))
    samples = np.array(samples)
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(probes))


def sam_sharpness(model: torch.nn.Module, batches: Sequence[Batch], *, rho: float = 0.05,
                  loss_fn: LossFn = response_token_loss) -> dict[str, float]:
    """SAM's sharpness max_{|e|<=rho} L(theta+e) - L(theta), first order: e = rho g / |g| (Foret et al. 2021)."""
    if not (math.isfinite(rho) and rho > 0):
        raise UsageError(f"rho={rho!r}; it must be a positive finite radius")
    params = model_params(model)
    with evaluating(model):
        loss, grad = gradient(model, batches, loss_fn)
        grad_norm = math.sqrt(_dot(grad, grad))
        if grad_norm == 0:
            return {"sharpness": 0.0, "loss": loss, "perturbed_loss": loss, "grad_norm": 0.0, "rho": rho}
        with torch.no_grad():
            torch._foreach_add_(params, grad, alpha=rho / grad_norm)
        perturbed = mean_loss(model, batches, loss_fn)
    return {"sharpness": perturbed - loss, "loss": loss, "perturbed_loss": perturbed, "grad_norm": grad_norm,
            "rho": rho}


def curvature(model: torch.nn.Module, batches: Sequence[Batch], *, rho: float = 0.05, iters: int = 20,
              probes: int = 10, seed: int = 0, loss_fn: LossFn = response_token_loss) -> dict[str, float]:
    """All three measures beyond the paper on the same batches, as one flat dict (with the power iteration's
    convergence: ``hessian_top_eigenvalue_converged`` false marks an estimate to leave out)."""
    sam = sam_sharpness(model, batches, rho=rho, loss_fn=loss_fn)
    trace, trace_se = hessian_trace(model, batches, probes=probes, seed=seed, loss_fn=loss_fn)
    top = power_iteration(model, batches, iters=iters, seed=seed, loss_fn=loss_fn)
    return {"loss": sam["loss"], "grad_norm": sam["grad_norm"], "rho": rho, "sam_sharpness": sam["sharpness"],
            "hessian_top_eigenvalue": top["eigenvalue"], "hessian_top_eigenvalue_iters": top["iterations"],
            "hessian_top_eigenvalue_rel_change": top["rel_change"],
            "hessian_top_eigenvalue_converged": top["converged"],
            "hessian_trace": trace, "hessian_trace_stderr": trace_se, "hutchinson_probes": probes}


def curvature_of(model: torch.nn.Module, batches: Sequence[Batch], spec: dict) -> dict[str, float]:
    """``curvature`` as a preset's ``landscape`` spec says: ``hessian_iters`` power iterations and
    ``hutchinson_probes`` probes (the one place its keys become this module's arguments)."""
    return curvature(model, batches, iters=spec["hessian_iters"], probes=spec["hutchinson_probes"])
