"""Sharpness-Aware Minimization (Foret et al., 2021) that stays right when gradients are sharded.

SAM minimises the loss at the worst point of a ball of radius ``rho`` around the weights. Each update:

1. ``first_step``: with the gradient ``g`` at ``w``, move to ``w + e``, ``e = rho * g / ||g||``
   (ASAM, Kwon et al. 2021: ``e = rho * |w|^2 g / || |w| g ||``, elementwise);
2. the caller recomputes the gradient at ``w + e`` (same batch: the same micro-batches);
3. ``second_step``: put the weights back to ``w`` and let the base optimizer step with that gradient.

``||g||`` must be the norm of the *whole* gradient. Under DDP every rank holds the full, already averaged
gradient, so the local norm is the global one. Under FSDP1/FSDP2/DeepSpeed ZeRO each rank holds a
shard; the norm of a shard is not the norm of the gradient, and perturbing every shard to radius rho
gives a ball of radius ``rho * sqrt(world_size)`` (what SAM ports that take per-rank norms do under
FSDP, the paper's code included). Here the squared local norms are all-reduced first:

* DTensor parameters (FSDP2 ``fully_shard``) are detected and reduced through their placements;
* plain tensors that are shards (FSDP1 flat parameters, ZeRO partitions) need ``sharded=True``
  (and ``process_group`` where the shard group is not the world, e.g. HSDP); FSDP1 parameters are
  detected and refused until the caller says which, because NO_SHARD looks the same as FULL_SHARD.

Also: an ``eps`` guard (a zero gradient gives no perturbation, not NaN); the weights are restored by
copying a saved copy back (exact, unlike subtracting ``e``), and that copy, one flat buffer, is the only extra memory
(one copy of the parameters, freed after ``second_step``); ``state_dict`` is the base optimizer's
state plus ``rho``/``adaptive`` per group, so it round-trips and torch.distributed.checkpoint can
handle it. With fp16 and a ``GradScaler``, call ``scaler.unscale_(sam)`` before ``first_step``;
``cfsam.training`` shows the full sequence.

SAM every k updates (``every=k``; MosaicML Composer's ``SAMOptimizer(interval=k)``): SAM costs two
forward/backward passes per update, so on k-1 of every k updates the trainer takes a plain
base-optimizer step from one pass (``plain_step``) and pays for the second pass only on the others:
the amortised cost is (k+1)/k passes, 1.25x AdamW at k=4. Which updates are SAM ones follows from the
number of updates taken, kept in every param group (``sam_updates``, next to ``sam_every``) so that it
is in the state_dict and a resumed run picks up exactly where it stopped. k=1 is SAM. (LookSAM, Liu
et al. 2022, would instead reuse the direction of the last SAM gradient on the cheap updates; the
plain step keeps the method exact to state and to reason about.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from cfsam.core.defaults import DEFAULT_RHO
from cfsam.core.errors import UsageError

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()


def _is_dtensor(t: torch.Tensor) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def _norm(t: torch.Tensor) -> torch.Tensor:
    # at least fp32 accumulation: the norm of a bf16 gradient overflows or loses bits otherwise
    return torch.linalg.vector_norm(t, 2.0, dtype=torch.promote_types(t.dtype, torch.float32))


def _piece(t: torch.Tensor, sharded: bool | None) -> torch.Tensor:
    """One tensor's contribution to a global norm: its norm, still a DTensor (partial) when sharded."""
    if _is_dtensor(t) and sharded is False:
        return _norm(t.to_local())
    return _norm(t)


def _combine(pieces: list[torch.Tensor], sharded: bool | None, process_group, device) -> torch.Tensor:
    """sqrt(sum of squares) of per-tensor norms across ranks (at most two scalar collectives)."""
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in pieces) else torch.float32
    sq = torch.zeros((), dtype=dtype, device=device)
    plain = [n.to(device, dtype) for n in pieces if not _is_dtensor(n)]
    dtensors = [n for n in pieces if _is_dtensor(n)]
    if plain:
        sq = sq + torch.stack(plain).square().sum()
    if sharded is True and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=process_group)
    if dtensors:
        sq = sq + torch.linalg.vector_norm(torch.stack(dtensors)).full_tensor().to(device, dtype).square()
    return sq.sqrt()


@torch.no_grad()
def global_norm(tensors, sharded: bool | None = None, process_group=None) -> torch.Tensor:
    """2-norm of ``tensors`` taken as one vector over all ranks (``sharded`` as in :class:`SAM`).

    ``cfsam.training`` uses it for the gradient norm it logs and clips, with AdamW as with SAM."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    first = tensors[0]
    device = first.to_local().device if _is_dtensor(first) else first.device
    return _combine([_piece(t, sharded) for t in tensors], sharded, process_group, device)


def _copies(params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
    """A copy of each tensor's values. Plain tensors are copied into one flat buffer per device and dtype:
    many small copies would come from the allocator's heaps, which the second pass's activations then
    cannot reuse whole (measured: 1.25x the parameter bytes of extra peak memory for SAM at 8 x 256
    tokens of SmolLM2-135M, against 0.53x with one buffer). DTensor shards are cloned one by one."""
    out: dict[torch.Tensor, torch.Tensor] = {}
    plain: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if _is_dtensor(p):
            out[p] = p.detach().clone()
        else:
            plain.setdefault((p.device, p.dtype), []).append(p)
    for (device, dtype), ps in plain.items():
        flat = torch.empty(sum(p.numel() for p in ps), device=device, dtype=dtype)
        for p, view in zip(ps, flat.split([p.numel() for p in ps])):
            out[p] = view.view_as(p).copy_(p.detach())
    return out


class SAM(torch.optim.Optimizer):
    """``SAM(params, torch.optim.AdamW, rho=2.0, adaptive=False, lr=..., ...)``.

    ``sharded``: None (auto: DTensor shards are reduced exactly, plain tensors are taken as full
    replicas as under DDP), True (plain tensors are shards: all-reduce their squared norms over
    ``process_group``), False (every rank uses only what it holds, with no reduction; under sharding
    this is the per-shard norm of most SAM ports, kept for comparisons).

    Use either ``first_step()`` / backward at the perturbed point / ``second_step()``, or, after
    ``loss.backward()``, ``step(closure)`` where ``closure`` re-runs forward and backward (as in
    davda54/sam). ``step()`` without a closure is a plain base-optimizer step:
    torch.distributed.checkpoint calls it with zero gradients and lr 0 to create optimizer state.
    """

    def __init__(self, params, base_optimizer=torch.optim.AdamW, rho: float = DEFAULT_RHO, adaptive: bool = False,
                 eps: float = 1e-12, sharded: bool | None = None, process_group=None, every: int = 1, **kwargs):
        if not rho > 0:
            raise UsageError(f"SAM needs rho > 0, got rho={rho!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every={every!r}: SAM every k updates needs an integer k >= 1 (1: every update)")
        if not eps > 0:
            raise UsageError(f"SAM needs eps > 0, got eps={eps!r}")
        if sharded not in (None, True, False):
            raise UsageError(f"sharded must be None, True or False, got {sharded!r}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, sam_every=every, sam_updates=0, **kwargs))
        # The base optimizer works on the very same group dicts and state: one set of hyper-parameters
        # (an lr scheduler on either sees both) and one state_dict.
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.eps = eps
        self.sharded = sharded
        self.process_group = process_group
        self._saved: dict[torch.Tensor, torch.Tensor] = {}  # param -> its weights before first_step
        self.last_grad_norm: float | None = None  # the (ASAM-weighted when adaptive) norm used for e
        self.last_perturbation_norm: float | None = None  # ||e|| over all ranks
        if sharded is None and any(getattr(p, "_fsdp_flattened", False) for p in self._params()):
            raise UsageError(
                "SAM got FSDP1 parameters with sharded=None: pass sharded=True for FULL_SHARD / "
                "SHARD_GRAD_OP / HYBRID_SHARD (with process_group=the shard group for HYBRID) or "
                "sharded=False for NO_SHARD")

    def _params(self):
        for group in self.param_groups:
            yield from group["params"]

    def _device(self) -> torch.device:
        p = next(self._params())
        return p.to_local().device if _is_dtensor(p) else p.device

    @torch.no_grad()
    def grad_norm(self, adaptive: bool = False) -> torch.Tensor:
        """Global 2-norm of the current gradients (of ``|w| * g`` when ``adaptive``)."""
        return _combine([_piece(p.abs() * p.grad if adaptive else p.grad, self.sharded)
                         for p in self._params() if p.grad is not None], self.sharded, self.process_group,
                        self._device())

    # -- which updates are SAM updates -----------------------------------------------------------
    @property
    def updates(self) -> int:
        """Updates taken so far (SAM and plain; skipped ones do not count)."""
        return int(self.param_groups[0]["sam_updates"])

    @property
    def is_sam_step(self) -> bool:
        """Whether the next update is a SAM one (two passes) or a plain base-optimizer one (one pass)."""
        return self.updates % int(self.param_groups[0]["sam_every"]) == 0

    def _count_update(self) -> None:
        for group in self.param_groups:
            group["sam_updates"] = int(group["sam_updates"]) + 1

    @torch.no_grad()
    def plain_step(self, zero_grad: bool = True) -> None:
        """An update of the base optimizer with the gradient at ``w`` (the cheap updates of ``every > 1``)."""
        if self._saved:
            raise RuntimeError("plain_step called between first_step and second_step")
        self.base_optimizer.step()
        self._count_update()
        if zero_grad:
            self.zero_grad()

    # -- the two steps ---------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> torch.Tensor:
        """Save the weights and move them to ``w + e``. Returns the gradient norm used.

        A non-finite norm (an fp16 overflow, a NaN loss) leaves the weights alone and saves nothing;
        the caller must then skip this update (``second_step`` refuses to run)."""
        if self._saved:
            raise RuntimeError("first_step called twice without second_step/restore in between")
        adaptive = any(g["adaptive"] for g in self.param_groups)
        grad_norm = self.grad_norm(adaptive=adaptive)
        self.last_grad_norm = float(grad_norm)  # one host sync per step, needed for the finite check
        if not torch.isfinite(grad_norm):
            self.last_perturbation_norm = 0.0
            if zero_grad:
                self.zero_grad()
            return grad_norm
        self._saved = _copies([p for group in self.param_groups for p in group["params"] if p.grad is not None])
        e_pieces = []
        for group in self.param_groups:
            scale = group["rho"] / (self.last_grad_norm + self.eps)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["adaptive"]:
                    e = torch.mul(p, p).mul_(p.grad).mul_(scale)  # one param-sized temporary at a time
                    p.add_(e)
                    e_pieces.append(_piece(e, self.sharded))
                else:
                    p.add_(p.grad, alpha=scale)
                    e_pieces.append(_piece(p.grad, self.sharded) * scale)
        self.last_perturbation_norm = float(_combine(e_pieces, self.sharded, self.process_group, self._device()))
        if zero_grad:
            self.zero_grad()
        return grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (exact) without an update; used to skip a step."""
        for p, saved in self._saved.items():
            p.copy_(saved)
        self._saved.clear()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Back to ``w``, then the base optimizer steps with the gradient taken at ``w + e``."""
        if not self._saved:
            raise RuntimeError("second_step called without a (finite) first_step before it")
        self.restore()
        self.base_optimizer.step()
        self._count_update()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """With ``closure``: the gradient at ``w`` must already be there (``loss.backward()``);
        ``closure`` re-runs forward and backward at ``w + e`` (on a SAM update; on the others of
        ``every > 1`` it is not called). Without: a plain base-optimizer step, not counted as an update
        (torch.distributed.checkpoint calls it to create the state)."""
        if closure is None:
            return self.base_optimizer.step()
        if not self.is_sam_step:
            self.plain_step(zero_grad=True)
            return None
        self.first_step(zero_grad=True)
        if not self._saved:  # non-finite gradient: skip the update
            return None
        loss = torch.enable_grad()(closure)()
        self.second_step(zero_grad=True)
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict rebinds self.state and self.param_groups: share them again
        self.base_optimizer.state = self.state
        self.base_optimizer.param_groups = self.param_groups
        for group in self.param_groups:  # a state saved before SAM-every-k existed: SAM on every update
            group.setdefault("sam_every", 1)
            group.setdefault("sam_updates", 0)

