"""One optimizer update: AdamW (one pass) or SAM (two), with accumulation, DDP/FSDP/ZeRO, AMP."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from cfsam.core.errors import RunFailed
from cfsam.core.sam import SAM, global_norm
from cfsam.training import zero
from cfsam.training.loss import summed_loss


class TrainingDiverged(RunFailed):
    """A non-finite loss or gradient: the run stopped; the last good checkpoint is kept."""


@dataclass
class StepContext:
    world: int = 1
    no_sync: Callable | None = None  # DDP's model.no_sync; None: synchronise every micro-batch
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    max_grad_norm: float | None = None
    device_type: str = "cpu"
    engine: object | None = None  # a DeepSpeed engine (the model): backward and step go through it


def _backward(loss: torch.Tensor, is_last: bool, ctx: StepContext) -> None:
    if ctx.engine is None:
        (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        return
    # the loss is already this micro-batch's share of the global mean: no division by the
    # accumulation steps; the boundary flag makes the last backward of each pass complete the reduction
    ctx.engine.set_gradient_accumulation_boundary(is_last)
    ctx.engine.backward(loss, scale_wrt_gas=False)


def _passes(model, micro_batches, n_items, ctx: StepContext) -> torch.Tensor:
    """Forward+backward over the micro-batches; gradients of the global mean token loss. Returns this
    rank's share of that loss."""
    total = torch.zeros((), device=n_items.device)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if ctx.no_sync is None or last else ctx.no_sync():
            with torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast_dtype is not None):
                # the head on the labelled positions only; wrappers (DDP, FSDP2, DeepSpeed) run their own forward
                summed, _ = summed_loss(model, mb["input_ids"], mb.get("attention_mask"), mb["labels"])
                loss = summed / n_items  # the token mean over the global batch (num_items_in_batch)
            # DDP, FSDP and DeepSpeed average gradients over ranks; the loss is already a share of the global mean
            _backward(loss * ctx.world, last, ctx)
        total += loss.detach().float()
    return total


def _clip(params, norm: torch.Tensor, max_norm: float | None) -> None:
    if max_norm is not None and float(norm) > max_norm:
        coef = max_norm / (float(norm) + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


def optimizer_step(model, opt, micro_batches: list[dict], ctx: StepContext) -> dict:
    """One optimizer update from this rank's micro-batches (AdamW: one pass; SAM: two; SAM every k:
    two on every k-th update, counted by the optimizer, one on the others).

    Returns {"loss", "grad_norm", "perturbation_norm", "sam_grad_norm", "skipped"} (global values).
    With an fp16 GradScaler each SAM pass is unscaled before its norm is taken; the scaler is updated
    after each pass (so its growth counter counts passes), and an overflow in either pass skips the
    update with the weights restored. Raises TrainingDiverged on a non-finite loss.
    Under DeepSpeed (``ctx.engine``) ``opt`` is a ``cfsam.training.zero.ZeroSAM`` or None (AdamW)."""
    if ctx.engine is not None:
        return _engine_step(model, opt, micro_batches, ctx)
    params = [p for g in opt.param_groups for p in g["params"]]
    n_items = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro_batches)
    if ctx.world > 1:
        dist.all_reduce(n_items)
    n_items = n_items.clamp(min=1)
    loss = _passes(model, micro_batches, n_items, ctx)
    if ctx.world > 1:
        dist.all_reduce(loss)
    out = {"loss": float(loss), "grad_norm": None, "perturbation_norm": None, "sam_grad_norm": None, "skipped": False}
    if not math.isfinite(out["loss"]):
        opt.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss is {out['loss']}")
    scaler = ctx.scaler
    if scaler is not None:
        scaler.unscale_(opt)
    if isinstance(opt, SAM) and opt.is_sam_step:  # with sam_every=k > 1, one update in k
        out["grad_norm"] = float(opt.first_step(zero_grad=True))
        out["perturbation_norm"] = opt.last_perturbation_norm
        if scaler is not None:
            scaler.update()  # closes pass 1, so that pass 2 can be unscaled
        if not math.isfinite(out["grad_norm"]):
            return _skip_or_raise(out, ctx, "gradient")
        _passes(model, micro_batches, n_items, ctx)
        if scaler is not None:
            scaler.unscale_(opt)
        norm2 = opt.grad_norm()
        out["sam_grad_norm"] = float(norm2)
        if not math.isfinite(out["sam_grad_norm"]):
            opt.restore()
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            return _skip_or_raise(out, ctx, "gradient at the SAM-perturbed point (is rho too large?)")
        _clip(params, norm2, ctx.max_grad_norm)
        opt.second_step(zero_grad=True)
        if scaler is not None:
            scaler.update()
        return out
    norm = global_norm([p.grad for p in params if p.grad is not None])
    out["grad_norm"] = float(norm)
    if not math.isfinite(out["grad_norm"]):
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return _skip_or_raise(out, ctx, "gradient")
    _clip(params, norm, ctx.max_grad_norm)
    if isinstance(opt, SAM):
        opt.plain_step(zero_grad=False)  # one of SAM-every-k's cheap updates: counted, so the cycle resumes exactly
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()
    return out


def _engine_step(engine, zsam, micro_batches: list[dict], ctx: StepContext) -> dict:
    """``optimizer_step`` on a DeepSpeed engine: the gradients live in the engine's partitions, the
    engine clips (at ``max_grad_norm``, with the same global norm) and steps. No GradScaler here
    (fp16 is refused), so a non-finite value always stops the run."""
    n_items = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro_batches)
    dist.all_reduce(n_items)
    n_items = n_items.clamp(min=1)
    loss = _passes(engine, micro_batches, n_items, ctx)
    dist.all_reduce(loss)
    out = {"loss": float(loss), "grad_norm": None, "perturbation_norm": None, "sam_grad_norm": None, "skipped": False}
    if not math.isfinite(out["loss"]):
        raise TrainingDiverged(f"loss is {out['loss']}")
    if zsam is None or not zsam.is_sam_step:  # AdamW, or a cheap update of SAM every k
        out["grad_norm"] = float(zero.grad_norm(engine))
    else:
        out["grad_norm"] = float(zsam.first_step())
        out["perturbation_norm"] = zsam.last_perturbation_norm
        if math.isfinite(out["grad_norm"]):
            _passes(engine, micro_batches, n_items, ctx)
            out["sam_grad_norm"] = float(zsam.grad_norm())
            zsam.restore()
            if not math.isfinite(out["sam_grad_norm"]):
                raise TrainingDiverged("non-finite gradient at the SAM-perturbed point (is rho too large?)")
    if not math.isfinite(out["grad_norm"]):
        raise TrainingDiverged("non-finite gradient")
    engine.set_gradient_accumulation_boundary(True)
    engine.step()  # clips, steps the fp32 masters, copies them into the module, zeroes the gradients
    return out


def _skip_or_raise(out: dict, ctx: StepContext, what: str) -> dict:
    if ctx.scaler is None:  # no loss scale to lower: a real divergence
        raise TrainingDiverged(f"non-finite {what}")
    out["skipped"] = True  # fp16 overflow: the scaler has lowered its scale, try the next batch
    return out


def build_optimizer(model, optimizer: str, lr: float, weight_decay: float, rho: float, adaptive: bool,
                    sam_every: int = 1):
    # no weight decay on biases and norm weights, as transformers.Trainer does
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "sam":
        return SAM(groups, torch.optim.AdamW, rho=rho, adaptive=adaptive, every=sam_every, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)
