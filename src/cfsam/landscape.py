"""Loss landscapes: 2-D surfaces, 1-D interpolations and curvature measures around a model's weights.

The paper's first claim (Fig. 1, Table 1) is that forgetting goes with a sharper loss landscape. This
module measures that on a fixed set of batches:

* ``surface``: f(a, b) = L(theta0 + a*d1 + b*d2) on an N x N grid over [-span, span]^2 with seeded
  Gaussian directions d1, d2 (the paper), optionally filter-normalised (Li et al. 2018). Its
  ``flatness()`` gives the paper's SC, AG and MAG (``cfsam.flatness``); ``flatness_over_seeds``
  reports their mean and standard deviation over several direction seeds.
* ``interpolate``: L((1-t) theta_a + t theta_b), e.g. from the stage-1 to the stage-2 model.
* ``hessian_top_eigenvalue`` (power iteration on Hessian-vector products), ``hessian_trace``
  (Hutchinson) and ``sam_sharpness`` (first-order estimate of max_{|e|<=rho} L(theta+e) - L(theta)):
  standard sharpness measures, so that "sharper" does not rest on one random 2-D slice.

L is the mean next-token cross-entropy over response tokens (labels != -100) of all the batches
together (token-weighted). Weights are perturbed in place from one saved copy of theta0 and copied
back bit for bit afterwards; the model is never copied per grid point. Each grid point costs one
pass over the weights (theta0 + a d1 is formed once per grid row) plus the forward passes, so a
surface takes about N^2 loss evaluations (``benchmarks/bench_landscape.py`` measures the ratio).

Any loss can stand in for L: ``loss_fn(model, batch) -> (sum of per-item losses, number of items)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .flatness import flatness_metrics
from .io import write_json_atomic

log = logging.getLogger(__name__)

IGNORE = -100
Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, int]"]
METRICS = ("SC", "AG", "MAG")


# ------------------------------------------------------------------------------------------ loss
def response_token_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over response tokens (labels != -100), and their number."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   use_cache=False).logits
    # shift the labels rather than the logits: no copy of the (batch, length, vocab) tensor
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    loss = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def mean_loss(model: torch.nn.Module, batches: Sequence[Batch], loss_fn: LossFn = response_token_loss) -> float:
    """L(theta): the loss of all batches together, weighted by their number of items (tokens); eval mode."""
    with _eval_mode(model), torch.inference_mode():
        return _mean_loss(model, _on_device(batches, _params(model)[0].device), loss_fn)[0]


def _mean_loss(model, batches, loss_fn) -> tuple[float, int]:
    """(L, number of items it averages over)."""
    total, count = 0.0, 0
    for batch in batches:
        s, n = loss_fn(model, batch)
        total += float(s)
        count += n
    if count == 0:
        raise ValueError("the batches hold no labelled items (every label is -100); the loss is undefined")
    return total / count, count


def heldout_batches(dataset: str, tokenizer, *, n_examples: int = 8, batch_size: int = 4, max_length: int = 128,
                    seed: int = 1234, split: str = "heldout") -> list[Batch]:
    """A fixed list of padded batches of a named training set (``cfsam.data``), tokenised once."""
    from . import data

    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}; it must be positive")
    ds = data.build_dataset(dataset, tokenizer, n=n_examples, seed=seed, max_length=max_length, split=split)
    rows = [ds[i] for i in range(len(ds))]
    return [data.collate(rows[s:s + batch_size], tokenizer.pad_token_id) for s in range(0, len(rows), batch_size)]


def count_items(batches: Sequence[Batch]) -> int:
    """Number of response tokens the loss averages over (labels shifted by one, as in the loss)."""
    return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)


def _on_device(batches: Sequence[Batch], device: torch.device) -> list[Batch]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


# ------------------------------------------------------------------------------ weights in place
def _params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = list(model.parameters())  # tied weights (embeddings = lm_head) appear once
    if not params:
        raise ValueError("the model has no parameters")
    return params


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: L is a function of the weights), the previous mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Eval mode and one saved copy of the weights, copied back exactly on exit."""
    params = _params(model)
    with torch.no_grad():
        theta0 = [p.detach().clone() for p in params]
    with _eval_mode(model):
        try:
            yield theta0
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, theta0)


def _seed(*keys: int) -> int:
    """A 64-bit seed from integer keys (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def random_direction(model: torch.nn.Module, seed: int, *, which: int = 0, filter_norm: bool = True,
                     ignore_1d: bool = True) -> list[torch.Tensor]:
    """Gaussian direction number ``which`` of ``seed``: one tensor per parameter, same dtype and device.

    Each parameter's entries come from its own CPU generator seeded by (seed, which, parameter
    index), so a seed gives the same direction on any device, whatever the options, and the
    parameters can be drawn in parallel threads (torch releases the GIL).

    filter_norm: scale each output row of a >=2-D parameter to the norm of the same row of theta
    (Li et al. 2018), so the step is relative to each row's size. ignore_1d: zero the direction of
    1-D parameters (norm weights, biases); otherwise keep it, filter-normalised as a single row.
    (Li et al.'s code copies theta into kept 1-D directions instead; we keep them random.)
    """
    def draw(k: int, p: torch.Tensor) -> torch.Tensor:
        if p.dim() <= 1 and ignore_1d:
            return torch.zeros_like(p)
        generator = torch.Generator().manual_seed(_seed(seed, which, k))
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        if filter_norm:
            rows = d.view(p.shape[0] if p.dim() > 1 else 1, -1)  # a 1-D parameter is one row
            w_rows = p.detach().reshape(rows.shape)
            rows.mul_(w_rows.norm(dim=1, keepdim=True) / (rows.norm(dim=1, keepdim=True) + 1e-10))
        return d

    params = _params(model)
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        return list(pool.map(draw, range(len(params)), params))


# ---------------------------------------------------------------------------------- results I/O
class _Saved:
    """Save/load for a dataclass: numpy fields to ``<stem>.npz``, the rest to ``<stem>.json``, atomically."""

    @staticmethod
    def _stem(path) -> Path:
        path = Path(path)
        return path.with_suffix("") if path.suffix in (".npz", ".json") else path

    def save(self, path) -> Path:
        stem = self._stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in arrays}
        meta["kind"] = type(self).__name__
        for suffix, write in ((".npz", lambda f: np.savez(f, **arrays)),
                              (".json", lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode()))):
            final = stem.with_name(stem.name + suffix)
            tmp = final.with_name(final.name + ".tmp")
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, final)
        return stem

    @classmethod
    def load(cls, path):
        stem = cls._stem(path)
        meta = json.loads(stem.with_name(stem.name + ".json").read_text())
        if meta.pop("kind", None) != cls.__name__:
            raise ValueError(f"{stem}.json does not hold a {cls.__name__}")
        with np.load(stem.with_name(stem.name + ".npz")) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(**arrays, **meta)


@dataclass
class Surface(_Saved):
    """losses[i, j] = L(theta0 + x[i] d1 + y[j] d2); d1, d2 = ``random_direction(seed, which=0 / 1)``."""
    x: np.ndarray
    y: np.ndarray
    losses: np.ndarray
    seed: int
    settings: dict = field(default_factory=dict)  # span, n, filter_norm, ignore_1d
    model: dict = field(default_factory=dict)  # name, source, weights hash, dtype
    data: dict = field(default_factory=dict)  # dataset, split, examples, tokens

    @property
    def spacing(self) -> float:
        return float((self.x[-1] - self.x[0]) / (len(self.x) - 1))

    @property
    def center_loss(self) -> float:
        """L(theta0): the grid's centre (N is odd, so theta0 is a grid point)."""
        return float(self.losses[len(self.x) // 2, len(self.y) // 2])

    def flatness(self) -> dict[str, float]:
        return flatness_metrics(self.losses, self.spacing)


@dataclass
class Line(_Saved):
    """losses[k] = L((1 - t[k]) theta_a + t[k] theta_b)."""
    t: np.ndarray
    losses: np.ndarray
    model_a: dict = field(default_factory=dict)
    model_b: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ surfaces, lines
def surface(model: torch.nn.Module, batches: Sequence[Batch], *, n: int = 11, span: float = 0.2, seed: int = 0,
            filter_norm: bool = True, ignore_1d: bool = True, loss_fn: LossFn = response_token_loss,
            model_info: dict | None = None, data_info: dict | None = None, progress: bool = True) -> Surface:
    """The loss on an n x n grid over [-span, span]^2 around the model's weights (restored exactly after)."""
    if not (isinstance(n, int) and n >= 3 and n % 2 == 1):
        raise ValueError(f"n={n!r}; the grid needs an odd number of points >= 3 so theta0 is its centre")
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"span={span!r}; it must be a positive finite number")
    params = _params(model)
    batches = _on_device(batches, params[0].device)
    d1 = random_direction(model, seed, which=0, filter_norm=filter_norm, ignore_1d=ignore_1d)
    d2 = random_direction(model, seed, which=1, filter_norm=filter_norm, ignore_1d=ignore_1d)
    axis = np.linspace(-span, span, n)
    axis[n // 2] = 0.0
    losses = np.empty((n, n))
    bar = tqdm(total=n * n, desc=f"surface seed {seed}", disable=not progress, leave=False)
    with _evaluating(model) as theta0, torch.inference_mode():
        row = [torch.empty_like(p) for p in params]
        for i, a in enumerate(axis):
            for r, t, d in zip(row, theta0, d1):  # theta0 + a d1, once per grid row
                torch.add(t, d, alpha=float(a), out=r)
            for j, b in enumerate(axis):
                for p, r, d in zip(params, row, d2):  # one pass over the weights per grid point
                    torch.add(r, d, alpha=float(b), out=p)
                losses[i, j], items = _mean_loss(model, batches, loss_fn)
                bar.update()
        del row
    bar.close()
    del d1, d2
    settings = {"n": n, "span": float(span), "filter_norm": filter_norm, "ignore_1d": ignore_1d}
    data_info = {"items": items, "batches": len(batches), **(data_info or {})}
    return Surface(axis.copy(), axis.copy(), losses, seed, settings, dict(model_info or {}), data_info)


def summarize_flatness(surfaces: Sequence[Surface]) -> dict[str, dict]:
    """Per metric: mean, std (ddof=1; None for a single surface), the per-seed values and their seeds."""
    if not surfaces:
        raise ValueError("no surfaces to summarise")
    per_seed = [s.flatness() for s in surfaces]
    out = {}
    for m in METRICS:
        values = np.array([p[m] for p in per_seed])
        out[m] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                  "values": values.tolist(), "seeds": [s.seed for s in surfaces]}
    return out


def flatness_over_seeds(model: torch.nn.Module, batches: Sequence[Batch], seeds: Sequence[int] = (0, 1, 2),
                        **surface_kwargs) -> tuple[list[Surface], dict[str, dict]]:
    """One surface per direction seed, and the flatness metrics' mean and std over them."""
    if not seeds:
        raise ValueError("seeds is empty; give at least one direction seed")
    surfaces = [surface(model, batches, seed=s, **surface_kwargs) for s in seeds]
    return surfaces, summarize_flatness(surfaces)


def interpolate(model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Sequence[Batch], *,
                t: Sequence[float] | int = 11, loss_fn: LossFn = response_token_loss,
                model_info_a: dict | None = None, model_info_b: dict | None = None,
                data_info: dict | None = None, progress: bool = True) -> Line:
    """L((1-t) theta_a + t theta_b) for t in ``t`` (an int n means n points over [0, 1]).

    model_a's weights are moved along the line and restored; model_b is only read. torch.lerp is
    exact at t = 0 and t = 1, so the endpoints are the two models' own losses.
    """
    ts = np.linspace(0.0, 1.0, t) if isinstance(t, int) else np.asarray(t, dtype=np.float64)
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"t={t!r}; give at least 2 interpolation points (or their number)")
    names_a = [(k, p.shape) for k, p in model_a.named_parameters()]
    names_b = [(k, p.shape) for k, p in model_b.named_parameters()]
    if names_a != names_b:
        diff = sorted(set(names_a) ^ set(names_b))[:3]
        raise ValueError(f"the two models' parameters differ (names or shapes), e.g. {diff}; "
                         "interpolation needs the same architecture")
    params_a = _params(model_a)
    theta_b = [q.detach().to(device=p.device, dtype=p.dtype) for p, q in zip(params_a, _params(model_b))]
    batches = _on_device(batches, params_a[0].device)
    losses = np.empty(len(ts))
    with _evaluating(model_a) as theta_a, torch.inference_mode():
        for k, tk in enumerate(tqdm(ts, desc="interpolation", disable=not progress, leave=False)):
            torch._foreach_copy_(params_a, theta_a)
            torch._foreach_lerp_(params_a, theta_b, float(tk))
            losses[k], items = _mean_loss(model_a, batches, loss_fn)
    data_info = {"items": items, "batches": len(batches), **(data_info or {})}
    return Line(ts, losses, dict(model_info_a or {}), dict(model_info_b or {}), data_info)


# ------------------------------------------------------------------------------------- curvature
def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x * y).sum(dtype=torch.float64) for x, y in zip(a, b)))


def gradient(model: torch.nn.Module, batches: Sequence[Batch],
             loss_fn: LossFn = response_token_loss) -> tuple[float, list[torch.Tensor]]:
    """L(theta) and its gradient, one batch at a time (the loss is a sum over batches / item count)."""
    params = _params(model)
    batches = _on_device(batches, params[0].device)
    grad = [torch.zeros_like(p) for p in params]
    total, count = 0.0, 0
    with _eval_mode(model):
        for batch in batches:
            s, n = loss_fn(model, batch)
            g = torch.autograd.grad(s, params, allow_unused=True, materialize_grads=True)
            torch._foreach_add_(grad, g)
            total, count = total + float(s.detach()), count + n
    if count == 0:
        raise ValueError("the batches hold no labelled items (every label is -100); the loss is undefined")
    torch._foreach_div_(grad, count)
    return total / count, grad


def hvp(model: torch.nn.Module, batches: Sequence[Batch], vector: Sequence[torch.Tensor],
        loss_fn: LossFn = response_token_loss) -> list[torch.Tensor]:
    """H v for the Hessian H of L(theta), by double backward, one batch at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = _params(model)
    batches = _on_device(batches, params[0].device)
    out = [torch.zeros_like(p) for p in params]
    count = 0
    # the fused CPU/GPU attention kernels have no second derivative; the math one has
    with sdpa_kernel([SDPBackend.MATH]), _eval_mode(model):
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


def hessian_top_eigenvalue(model: torch.nn.Module, batches: Sequence[Batch], *, iters: int = 20,
                           tol: float = 1e-3, seed: int = 0, loss_fn: LossFn = response_token_loss) -> float:
    """The Hessian's dominant eigenvalue (largest in magnitude, sign kept) by power iteration on H v.

    Stops when the Rayleigh quotient changes by less than ``tol`` (relative) or after ``iters`` HVPs.
    """
    if iters < 1:
        raise ValueError(f"iters={iters}; power iteration needs at least one step")
    params = _params(model)
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in params]
    eig = None
    with _eval_mode(model):
        for k in tqdm(range(iters), desc="power iteration", leave=False):
            norm = math.sqrt(_dot(v, v))
            if norm == 0:  # H v = 0: v lies in the null space, and so would every further iterate
                return 0.0
            torch._foreach_div_(v, norm)
            hv = hvp(model, batches, v, loss_fn)
            new = _dot(v, hv)  # Rayleigh quotient of the unit vector v
            done = eig is not None and abs(new - eig) <= tol * abs(new)
            eig, v = new, hv
            if done:
                log.info("power iteration converged after %d HVPs: %.6g", k + 1, eig)
                return eig
    log.warning("power iteration stopped after %d HVPs without converging to tol=%g (last %.6g)", iters, tol, eig)
    return eig


def hessian_trace(model: torch.nn.Module, batches: Sequence[Batch], *, probes: int = 10, seed: int = 0,
                  loss_fn: LossFn = response_token_loss) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H), mean of v^T H v over Rademacher probes v, and its standard error."""
    if probes < 2:
        raise ValueError(f"probes={probes}; Hutchinson's estimate with a standard error needs at least 2")
    params = _params(model)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    with _eval_mode(model):
        for _ in tqdm(range(probes), desc="Hutchinson", leave=False):
            v = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
            samples.append(_dot(v, hvp(model, batches, v, loss_fn)))
    samples = np.array(samples)
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(probes))


def sam_sharpness(model: torch.nn.Module, batches: Sequence[Batch], *, rho: float = 0.05,
                  loss_fn: LossFn = response_token_loss) -> dict[str, float]:
    """SAM's sharpness max_{|e|<=rho} L(theta+e) - L(theta), first order: e = rho g / |g| (Foret et al. 2021)."""
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho={rho!r}; it must be a positive finite radius")
    params = _params(model)
    with _evaluating(model):
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
    """All three measures beyond the paper on the same batches, as one flat dict."""
    sam = sam_sharpness(model, batches, rho=rho, loss_fn=loss_fn)
    trace, trace_se = hessian_trace(model, batches, probes=probes, seed=seed, loss_fn=loss_fn)
    return {"loss": sam["loss"], "grad_norm": sam["grad_norm"], "rho": rho, "sam_sharpness": sam["sharpness"],
            "hessian_top_eigenvalue": hessian_top_eigenvalue(model, batches, iters=iters, seed=seed, loss_fn=loss_fn),
            "hessian_trace": trace, "hessian_trace_stderr": trace_se, "hutchinson_probes": probes}


# ------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    """Register ``cfsam landscape`` on an argparse subparsers object."""
    p = subparsers.add_parser("landscape", help="loss surfaces, flatness (SC/AG/MAG) and curvature of a model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model preset or saved model directory")
    p.add_argument("--out", required=True, help="directory for surfaces and landscape.json")
    p.add_argument("--data", default="alpaca", help="training set whose held-out slice gives the loss")
    p.add_argument("--split", default="heldout", choices=["heldout", "train", "all"])
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--grid", type=int, default=11, help="points per axis (odd)")
    p.add_argument("--span", type=float, default=0.2,
                   help="grid covers [-span, span]^2 (filter-normalised units; raw Gaussian directions need ~0.02)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="direction seeds")
    p.add_argument("--no-filter-norm", dest="filter_norm", action="store_false",
                   help="raw Gaussian directions instead of filter-normalised ones")
    p.add_argument("--keep-1d", dest="ignore_1d", action="store_false",
                   help="perturb 1-D parameters (norms) too instead of leaving them at theta0")
    p.add_argument("--curvature", action="store_true", help="also Hessian top eigenvalue, trace, SAM sharpness")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--power-iters", type=int, default=20)
    p.add_argument("--probes", type=int, default=10)
    p.add_argument("--interpolate-from", metavar="MODEL_A",
                   help="also the 1-D line from this model (e.g. the stage-1 model) to MODEL")
    p.add_argument("--line-points", type=int, default=11)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--plot", action="store_true", help="write contour and 3-D plots of the first seed")
    p.set_defaults(func=_run_cli)


def _model_info(loaded, dtype: str) -> dict:
    from .models import weights_hash

    return {"name": loaded.name, "source": loaded.source, "weights_hash": weights_hash(loaded.model), "dtype": dtype}


def _run_cli(args) -> int:
    from . import data
    from .models import load_model

    bad = [msg for ok, msg in [
        (args.grid >= 3 and args.grid % 2 == 1, f"--grid {args.grid}: use an odd number of points >= 3"),
        (math.isfinite(args.span) and args.span > 0, f"--span {args.span}: use a positive number"),
        (math.isfinite(args.rho) and args.rho > 0, f"--rho {args.rho}: use a positive radius"),
        (args.power_iters >= 1, f"--power-iters {args.power_iters}: use at least 1"),
        (args.probes >= 2, f"--probes {args.probes}: use at least 2"),
        (args.line_points >= 2, f"--line-points {args.line_points}: use at least 2"),
    ] if not ok]
    if bad:  # before loading anything
        raise SystemExit("; ".join(bad))
    out = Path(args.out)
    dtype = getattr(torch, args.dtype)
    loaded = load_model(args.model, dtype=dtype)
    batches = heldout_batches(args.data, loaded.tokenizer, n_examples=args.examples, batch_size=args.batch_size,
                              max_length=args.max_length, seed=args.data_seed, split=args.split)
    data_info = {"dataset": args.data, "label": data.label(args.data), "split": args.split,
                 "examples": args.examples, "batch_size": args.batch_size, "max_length": args.max_length,
                 "seed": args.data_seed}
    model_info = _model_info(loaded, args.dtype)
    surfaces, summary = flatness_over_seeds(
        loaded.model, batches, args.seeds, n=args.grid, span=args.span, filter_norm=args.filter_norm,
        ignore_1d=args.ignore_1d, model_info=model_info, data_info=data_info)
    for s in surfaces:
        s.save(out / f"surface-seed{s.seed}")
    report = {"model": model_info, "data": surfaces[0].data, "settings": surfaces[0].settings,
              "center_loss": surfaces[0].center_loss, "flatness": summary}
    if args.curvature:
        report["curvature"] = curvature(loaded.model, batches, rho=args.rho, iters=args.power_iters,
                                        probes=args.probes)
    if args.interpolate_from:
        start = load_model(args.interpolate_from, dtype=dtype)
        line = interpolate(start.model, loaded.model, batches, t=args.line_points,
                           model_info_a=_model_info(start, args.dtype), model_info_b=model_info, data_info=data_info)
        line.save(out / "line")
        report["line"] = {"t": line.t.tolist(), "losses": line.losses.tolist()}
    if args.plot:
        from . import plots

        plots.save_figure(plots.contour_grid({loaded.name: surfaces[0]}), out / "contour.png", close=True)
        plots.save_figure(plots.surface_grid({loaded.name: surfaces[0]}), out / "surface3d.png", close=True)
    write_json_atomic(out / "landscape.json", report)
    print(json.dumps({m: summary[m] for m in METRICS} | {"center_loss": report["center_loss"]}, indent=1))
    return 0
