"""SAM inside the transformers ``Trainer`` (and TRL's ``SFTTrainer``): ``SAMTrainer`` and ``SAMTrainerMixin``.

    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, rho=0.05)
    class SAMSFTTrainer(SAMTrainerMixin, trl.SFTTrainer): ...   # the same for TRL (mixin first)

The SAM math is cfsam's own (:class:`cfsam.core.sam.SAM`); this module only fits its two passes into the
Trainer's loop without changing what the loop does around them.

How the Trainer runs one optimizer step (transformers 5.x, ``Trainer._run_epoch``): it fetches the step's
micro-batches and the global count of label tokens ``num_items_in_batch`` (summed over micro-batches and
ranks), calls ``training_step(model, mb, num_items_in_batch)`` once per micro-batch (forward + backward; the
loss is each micro-batch's share of the global token mean; DDP syncs only on the last one), and sets
accelerate's ``sync_gradients`` flag to True just before the call for the last micro-batch of the step.
After that call it clips, calls ``optimizer.step()`` and zeroes the gradients.

What this module does (the whole design is in ``training_step``):

1. every call runs the Trainer's own ``training_step`` (pass 1, at ``w``) and remembers its micro-batch
   and the ``num_items_in_batch`` it was run with;
2. on the call where ``sync_gradients`` is True, the gradients hold the sum over exactly the remembered
   micro-batches (the Trainer zeroes them after every optimizer step, and we forget the micro-batches at
   the same moment): that is the accumulated gradient ``g`` of the whole step, all-reduced under DDP;
3. with an fp16 loss scaler, ``g`` is unscaled (multiplied by 1/scale, exact for a power of two) so the
   logged norm is the true one; ``SAM.first_step`` takes the global norm of ``g`` and moves to ``w + e``,
   ``e = rho * g / ||g||`` (ASAM when ``adaptive``);
4. the gradients are zeroed and the remembered micro-batches are re-run through the same
   ``training_step`` with the same ``num_items_in_batch`` (pass 2, at ``w + e``; DDP syncs on the last
   one): the gradient of the same loss on the same data, at the perturbed point;
5. ``SAM.restore`` copies the saved ``w`` back (bitwise) and returns; the Trainer then clips the pass-2
   gradient, unscales it (fp16), and ``optimizer.step()`` runs the base optimizer (``SAM.step`` without a
   closure) with it; the scheduler and ``zero_grad`` follow as usual.

So one update equals ``cfsam.training.step.optimizer_step`` on the concatenated micro-batches, with any
gradient accumulation and any number of DDP ranks (the tests check both to fp32 precision). The optimizer is
the one the Trainer would build (``args.optim``, its weight-decay groups, ``optimizer_cls_and_kwargs``)
wrapped in :class:`SAM`, so the learning-rate scheduler and checkpoints see one optimizer.

fp16: pass 1's gradient is unscaled by hand instead of through ``GradScaler.unscale_``, which may only run
once per ``scaler.update()``: the Trainer's own unscale, inf check and update then act on pass 2 as they
would on a plain step. An overflow in pass 1 leaves the weights where they are and the non-finite gradient
in place, so the scaler skips that step and lowers its scale; an overflow in pass 2 does the same after the
restore. Without a scaler a non-finite gradient norm raises ``TrainingDiverged`` (the Trainer would step on
NaNs otherwise).

Logged with the Trainer's ``loss``: ``sam_grad_norm`` (``||g||`` at ``w``, the norm ``e`` is built from;
ASAM-weighted when adaptive) and ``sam_perturbation_norm`` (``||e||``, rho for SAM), each averaged over
the steps since the last log. The Trainer's own ``grad_norm`` is the norm of the pass-2 gradient, the one
the optimizer steps with and ``max_grad_norm`` clips.

Refused at construction (a ``ValueError`` naming the setting), because their gradients are not full,
replicated tensors that this code has been tested on, and a per-shard norm would silently perturb to a
radius of ``rho * sqrt(world_size)``: FSDP (1 and 2, incl. accelerate's ``dp_shard``), DeepSpeed (its
engine steps inside ``accelerator.backward``), tensor / context / sequence parallelism, models sharded at
load time (``tp_plan``), SageMaker model parallelism, LOMO and layer-wise GaLore optimizers (they step
inside backward).
For sharded SAM use cfsam's own trainer (``cfsam.core.sam`` with ``sharded=``, ``cfsam.training.zero``).

Cost: two forward/backward passes per optimizer step, plus one copy of the trainable weights while
perturbed. Dropout draws new masks in pass 2 (as in every SAM implementation); NEFTune noise likewise.
With TRL, pass 2 is kept out of ``SFTTrainer``'s token and accuracy counters.
"""
from __future__ import annotations

import contextlib
import math

import torch
from transformers import Trainer
from transformers.training_args import OptimizerNames
from transformers.utils import is_sagemaker_mp_enabled

from cfsam.core.defaults import DEFAULT_RHO
from cfsam.core.errors import UsageError
from cfsam.core.sam import SAM
from cfsam.training.step import TrainingDiverged


def _reuse(optimizer: torch.optim.Optimizer):
    """A ``base_optimizer`` factory for SAM that hands back an optimizer the Trainer already built."""
    def factory(param_groups, **_):
        if len(param_groups) != len(optimizer.param_groups) or any(
                a is not b for a, b in zip(param_groups, optimizer.param_groups)):
            raise RuntimeError("SAM must wrap the Trainer's optimizer on that optimizer's own param groups")
        return optimizer
    return factory


class SAMTrainerMixin:
    """SAM's two passes in ``training_step``; mix into ``Trainer`` or a subclass of it (mixin first).

    ``rho``: radius of the perturbation ball (> 0; default the paper's 2, ``DEFAULT_RHO``); ``adaptive``: ASAM (Kwon et al. 2021; use a larger
    rho, e.g. 0.5-2). See the module docstring for the design and what is refused."""

    def __init__(self, *args, rho: float = DEFAULT_RHO, adaptive: bool = False, **kwargs):
        if not (isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho)):
            raise UsageError(f"SAMTrainer needs a finite rho > 0, got rho={rho!r}")
        if not isinstance(adaptive, bool):
            raise UsageError(f"adaptive must be True or False, got adaptive={adaptive!r}")
        self.sam_rho, self.sam_adaptive = float(rho), adaptive
        self._sam_pending: list[tuple[dict, object]] = []  # (micro-batch, num_items_in_batch) since the last step
        self._sam_history: list[tuple[float, float]] = []  # (grad norm, perturbation norm) since the last log
        super().__init__(*args, **kwargs)
        self._sam_refuse_unsupported()

    def _sam_refuse_unsupported(self) -> None:
        # SAM's norm must be that of the whole gradient: a per-shard norm perturbs to radius rho*sqrt(world_size)
        shards = "the gradients are shards, and a per-shard norm would perturb to radius rho*sqrt(world_size)"
        pc = getattr(self.accelerator, "parallelism_config", None)
        optim = getattr(self.args.optim, "value", self.args.optim)
        refused = None
        if getattr(self, "is_deepspeed_enabled", False):
            refused = ("DeepSpeed", "its engine steps inside accelerator.backward and " + shards)
        elif getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False):
            refused = ("FSDP", shards)
        elif pc is not None and any(getattr(pc, f"{k}_enabled", False) for k in ("dp_shard", "tp", "cp", "sp")):
            refused = (f"parallelism_config={pc!r}", "only replicated data parallelism is tested: " + shards)
        elif getattr(self, "is_distributed_loading_by_transformers", False):
            refused = ("a model sharded at load time (tp_plan)", shards)
        elif is_sagemaker_mp_enabled():
            refused = ("SageMaker model parallelism", shards)
        elif optim in (OptimizerNames.LOMO.value, OptimizerNames.ADALOMO.value) or "layerwise" in optim:
            refused = (f"optim={optim!r}", "it steps inside backward, before SAM could perturb the weights")
        if refused:
            raise UsageError(
                f"SAMTrainer does not support {refused[0]}: {refused[1]}. Allowed: one process, DataParallel or "
                "DDP, in fp32/bf16/fp16, with an optimizer that steps in optimizer.step(). For sharded SAM use "
                "cfsam's own trainer (cfsam.core.sam.SAM with sharded=..., cfsam.training.zero.ZeroSAM).")

    # -- the optimizer: the Trainer's own, wrapped in SAM -------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            base = super().create_optimizer(model)
            self.optimizer = SAM(base.param_groups, _reuse(base), rho=self.sam_rho, adaptive=self.sam_adaptive)
        elif not isinstance(self.optimizer, SAM):
            raise TypeError(f"SAMTrainer got optimizers=({type(self.optimizer).__name__}, ...); pass a "
                            "cfsam.core.sam.SAM or let the Trainer build one from args.optim")
        return self.optimizer

    def _sam(self) -> SAM:
        opt = self.optimizer
        while not isinstance(opt, SAM):  # accelerate wraps it in an AcceleratedOptimizer
            opt = opt.optimizer
        return opt

    # -- the two passes ----------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # pass 1, at w
        self._sam_pending.append((inputs, num_items_in_batch))
        if self.accelerator.gradient_state.sync_gradients:  # the Trainer steps right after this call
            try:
                self._sam_perturbed_gradient(model)
            finally:
                self._sam_pending.clear()
        return loss

    def _sam_perturbed_gradient(self, model) -> None:
        """Replace the accumulated gradient at ``w`` by the one at ``w + e``, weights back at ``w``."""
        sam = self._sam()
        scaler = self.accelerator.scaler
        if scaler is not None:  # fp16: unscale pass 1 by hand (see the module docstring)
            inv_scale = 1.0 / scaler.get_scale()
            with torch.no_grad():
                for group in sam.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(inv_scale)
        grad_norm = float(sam.first_step(zero_grad=False))
        if not math.isfinite(grad_norm):
            if scaler is None:
                raise TrainingDiverged(f"non-finite gradient norm {grad_norm} at step {self.state.global_step}")
            return  # fp16 overflow: the scaler sees the non-finite gradient, skips the step, lowers the scale
        self._sam_history.append((grad_norm, sam.last_perturbation_norm))
        sam.zero_grad(set_to_none=True)
        try:
            with self._sam_second_pass_metrics():
                for i, (inputs, num_items) in enumerate(self._sam_pending):
                    last = i == len(self._sam_pending) - 1
                    with contextlib.nullcontext() if last else self.accelerator.no_sync(model=model):
                        super().training_step(model, inputs, num_items)  # pass 2, at w + e
        finally:
            sam.restore()  # also when pass 2 raises: never leave the weights perturbed
        if scaler is None and not math.isfinite(float(sam.grad_norm())):
            raise TrainingDiverged(f"non-finite gradient at the SAM-perturbed point at step "
                                   f"{self.state.global_step} (is rho={self.sam_rho} too large?)")

    @contextlib.contextmanager
    def _sam_second_pass_metrics(self):
        """Keep pass 2 out of TRL's per-step metrics (SFTTrainer counts tokens and accuracy in compute_loss)."""
        metrics = getattr(self, "_metrics", None)
        train = metrics.get("train") if isinstance(metrics, dict) else None
        saved = ({k: list(v) for k, v in train.items()} if train is not None else None,
                 getattr(self, "_total_train_tokens", None))
        try:
            yield
        finally:
            if train is not None:
                train.clear()
                train.update(saved[0])
            if saved[1] is not None:
                self._total_train_tokens = saved[1]

    # -- resuming ----------------------------------------------------------------------------------------
    def _issue_warnings_after_load(self, load_result) -> None:
        # a head tied to the input embeddings is not saved, so every resume reported it missing: harmless (it
        # is the embeddings, tied again here), and it read like a failure. Other missing keys are still shown.
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or ())
        missing = [k for k in load_result.missing_keys if k not in tied]
        if len(missing) < len(load_result.missing_keys):
            self.model.tie_weights()
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    # -- logging -----------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sam_history:
            n = len(self._sam_history)
            logs["sam_grad_norm"] = sum(g for g, _ in self._sam_history) / n
            logs["sam_perturbation_norm"] = sum(e for _, e in self._sam_history) / n
            self._sam_history.clear()
        super().log(logs, start_time)


class SAMTrainer(SAMTrainerMixin, Trainer):
    """``transformers.Trainer`` with SAM: ``SAMTrainer(model=..., args=..., train_dataset=..., rho=0.05)``.

    Without a ``data_collator`` it pads examples of ``input_ids`` and ``labels`` itself (right padding with the
    tokenizer's pad id, else the model config's; labels -100, attention 0): the Trainer's own default collators
    pad no labels, so every caller had to pass one."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("data_collator") is None and len(args) < 3:  # Trainer(model, args, data_collator, ...)
            model = kwargs.get("model", args[0] if args else None)
            kwargs["data_collator"] = PadCollator(_pad_id(kwargs.get("processing_class"), model))
        super().__init__(*args, **kwargs)


class PadCollator:
    """Right-pads a list of ``{"input_ids", "labels"}`` examples (``cfsam.data.formatting.collate``)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        from cfsam.data.formatting import collate

        return collate(features, self.pad_token_id)


def _pad_id(tokenizer, model) -> int:
    config = getattr(model, "config", None)
    for pad in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                getattr(config, "eos_token_id", None)):
        if isinstance(pad, list):
            pad = pad[0] if pad else None
        if pad is not None:
            return int(pad)
    raise UsageError("SAMTrainer needs a data_collator, or a pad token id to pad with: pass processing_class=tokenizer "
                     "or set model.config.pad_token_id")
