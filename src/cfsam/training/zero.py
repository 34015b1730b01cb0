"""SAM (and AdamW) on a DeepSpeed ZeRO engine, with the gradient norm taken over all partitions.

Why this is not ``cfsam.core.sam.SAM``: under ZeRO the module's parameters are not the tensors the
optimizer steps. The engine keeps fp32 master partitions inside its ZeRO optimizer, reduces the
gradients into per-rank partitions during ``engine.backward`` and copies the masters back into the
module's weights in ``engine.step()``. So SAM is done around the engine, not inside a torch optimizer:

1. pass 1 (``engine.backward`` over the micro-batches) leaves this rank's gradient partition;
2. :meth:`ZeroSAM.first_step` all-reduces the squared local norms into the *global* ``||g||`` and adds
   ``e = rho * g / ||g||`` to the weights that the module's forward reads (ZeRO-3: each parameter's
   local partition ``ds_tensor``, gathered again by the next forward; ZeRO-1/2: the replicated
   module parameters, with the full gradient assembled by DeepSpeed's ``safe_get_full_grad``);
3. pass 2 at ``w + e``; :meth:`ZeroSAM.restore` copies the saved weights back (exact);
4. ``engine.step()`` clips (``gradient_clipping`` = cfsam's ``max_grad_norm``, the same global norm)
   and steps the fp32 masters with the gradient taken at ``w + e``.

The masters are never perturbed, so the update starts from ``w`` even before the restore; the copy
back keeps the module's weights exact when a step is skipped. The extra memory is one copy of what
is perturbed: the local partitions under ZeRO-3, the parameters under ZeRO-1/2 (as ``optim.SAM``).
Cost: ZeRO-3 needs only scalar all-reduces on top of the engine's own traffic; ZeRO-1/2 replicate
the weights but partition the gradient, so each gradient norm (also the one logged for AdamW)
assembles the full gradient, one parameter-sized all-reduce per parameter.
Besides DeepSpeed's documented accessors (``deepspeed.utils.safe_get_local_grad`` /
``safe_get_full_grad``, ``engine.empty_partition_cache()``) this relies on two internals: ZeRO-3's
``param.ds_tensor`` (the local partition a forward gathers) and the ZeRO optimizer's ``zero_grad``
restarting gradient accumulation. tests/dist/sam_deepspeed.py checks both against one process
(written against deepspeed 0.19).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from cfsam.core.defaults import DEFAULT_RHO
from cfsam.core.errors import UsageError
from cfsam.core.sam import global_norm

STAGES = (1, 2, 3)


def engine_config(stage: int, micro_batch: int, grad_accum: int, world: int, max_grad_norm: float | None) -> dict:
    """The DeepSpeed config cfsam runs: fp32 weights and masters (bf16 is cfsam's own autocast),
    the batch split as in cfsam.training, clipping by DeepSpeed at ``max_grad_norm``."""
    if stage not in STAGES:
        raise UsageError(f"ZeRO stage {stage!r} is not supported here; allowed: 1 | 2 | 3 "
                         "(stage 0 is plain data parallelism: use dist='ddp')")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": float(max_grad_norm or 0.0),  # 0: off
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
        "steps_per_print": 2 ** 31 - 1,  # cfsam logs its own steps
        "wall_clock_breakdown": False,
    }


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """``deepspeed.initialize`` with a client optimizer; returns the engine (``engine.module`` is ``model``)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def is_engine(model) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return False
    return isinstance(model, DeepSpeedEngine)


def _stage(engine) -> int:
    stage = int(engine.zero_optimization_stage())
    if stage not in STAGES:
        raise UsageError(f"the engine runs ZeRO stage {stage}; ZeroSAM needs stage 1, 2 or 3")
    return stage


def _weights_and_grads(engine) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], bool]:
    """(what the forward reads, its gradient) per trainable parameter, and whether those are shards.

    ZeRO-3: this rank's partition of the weight and of the averaged gradient (disjoint across ranks;
    the padding of the last partition has a zero gradient). ZeRO-1/2: the full, replicated weight and
    the full gradient (one parameter-sized all-reduce each, done by DeepSpeed)."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    stage = _stage(engine)
    out = []
    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        if stage == 3:
            g = safe_get_local_grad(p)
            n = real_numel(p)
            out.append((p.ds_tensor.narrow(0, 0, n), g.view(p.ds_tensor.shape).narrow(0, 0, n)))
        else:
            g = safe_get_full_grad(p)
            if g is not None:
                out.append((p.data, g.view(p.shape)))
    return out, stage == 3


def real_numel(p) -> int:
    """How many of a ZeRO-3 parameter's local partition ``ds_tensor`` are weights. The last partition is
    padded to the common size, and DeepSpeed leaves that padding uninitialised (torch.empty): it may hold
    inf or NaN, which ASAM's |w| * g turned into a NaN norm now and then. Only the real elements enter."""
    size = p.ds_tensor.ds_numel
    start = size * dist.get_rank(group=getattr(p, "ds_process_group", None))
    return max(0, min(size, p.ds_numel - start))


def grad_norm(engine) -> torch.Tensor:
    """Global 2-norm of the engine's reduced gradient (call after the boundary backward, before step)."""
    pairs, sharded = _weights_and_grads(engine)
    return global_norm([g for _, g in pairs], sharded=sharded)


class ZeroSAM:
    """SAM's move to ``w + e`` and back on a DeepSpeed ZeRO engine (see the module docstring).

    ``ZeroSAM(engine, rho=2.0, adaptive=False)``; per update: pass 1 with ``engine.backward``,
    ``first_step()``, pass 2, ``restore()``, ``engine.step()``. ``adaptive``: ASAM,
    ``e = rho * w^2 g / || |w| g ||`` (elementwise, so it works on partitions as on full tensors).
    ``every=k``: SAM on every k-th update only (``cfsam.core.sam``); the others are the engine's plain
    step from pass 1. The count is the engine's ``global_steps``, which its checkpoints keep, so a
    resumed run continues the cycle exactly."""

    def __init__(self, engine, rho: float = DEFAULT_RHO, adaptive: bool = False, eps: float = 1e-12, every: int = 1):
        if not rho > 0:
            raise UsageError(f"SAM needs rho > 0, got rho={rho!r}")
        if not eps > 0:
            raise UsageError(f"SAM needs eps > 0, got eps={eps!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every={every!r}: SAM every k updates needs an integer k >= 1 (1: every update)")
        self.engine = engine
        self.every = every
        self.stage = _stage(engine)
        self.rho, self.adaptive, self.eps = float(rho), bool(adaptive), float(eps)
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, its value before first_step)
        self.last_grad_norm: float | None = None
        self.last_perturbation_norm: float | None = None

    @property
    def is_sam_step(self) -> bool:
        """Whether the next update (the engine's ``global_steps``-th, from 0) is a SAM one."""
        return int(self.engine.global_steps) % self.every == 0

    @torch.no_grad()
    def grad_norm(self, adaptive: bool = False) -> torch.Tensor:
        """Global norm of the current gradient (of ``|w| * g`` when ``adaptive``)."""
        pairs, sharded = _weights_and_grads(self.engine)
        return global_norm([w.abs() * g if adaptive else g for w, g in pairs], sharded=sharded)

    @torch.no_grad()
    def first_step(self) -> torch.Tensor:
        """Save the weights, move them to ``w + e`` and clear the gradients for pass 2.

        Returns the norm used; when it is not finite nothing moves (the caller stops or skips)."""
        if self._saved:
            raise RuntimeError("first_step called twice without restore in between")
        pairs, sharded = _weights_and_grads(self.engine)
        norm = global_norm([w.abs() * g if self.adaptive else g for w, g in pairs], sharded=sharded)
        self.last_grad_norm = float(norm)
        if not torch.isfinite(norm):
            self.last_perturbation_norm = 0.0
            return norm
        scale = self.rho / (self.last_grad_norm + self.eps)
        e_norms = []
        for w, g in pairs:
            e = torch.mul(w, w).mul_(g).mul_(scale) if self.adaptive else g * scale
            self._saved.append((w, w.clone()))
            w.add_(e)
            e_norms.append(e)
        self.last_perturbation_norm = float(global_norm(e_norms, sharded=sharded))
        # pass 2 must start from zero gradients: the ZeRO optimizer's zero_grad resets its accumulation
        # (ZeRO-3: the next backward copies into the partitions instead of adding)
        self.engine.optimizer.zero_grad()
        self._refresh()
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (exact)."""
        for w, saved in self._saved:
            w.copy_(saved)
        had = bool(self._saved)
        self._saved.clear()
        if had:
            self._refresh()

    def _refresh(self) -> None:
        # ZeRO-3 keeps small parameters gathered between forwards ("persistent", below
        # stage3_param_persistence_threshold): release every gathered copy so that the next forward
        # gathers the partitions just changed. ZeRO-1/2 modules read the changed tensors themselves.
        if self.stage == 3:
            self.engine.empty_partition_cache()


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's full state dict on CPU, on every rank. ZeRO-3 parameters are gathered one at a
    time (a collective: every rank must call this), so the peak is one full parameter per device."""
    import deepspeed

    out = {}
    for name, t in engine.module.state_dict(keep_vars=True).items():
        with deepspeed.zero.GatheredParameters([t], enabled=hasattr(t, "ds_id")):
            out[name] = t.detach().cpu().clone()
    return out
