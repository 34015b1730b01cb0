"""SAMTrainer (cfsam.training.hf_trainer) against cfsam's own SAM step, on the tiny random Llama.

One Trainer update must equal ``cfsam.training.step.optimizer_step`` with ``SAM(AdamW)`` on the same data:
in one process, with gradient accumulation (= one step on the concatenated batch: the perturbation comes
from the accumulated gradient), under 2-process DDP, and in bf16; FSDP and DeepSpeed are refused."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from cfsam.data.formatting import IGNORE, collate
from cfsam.training.hf_trainer import SAMTrainer
from cfsam.training.step import StepContext, build_optimizer, optimizer_step

ROOT = Path(__file__).resolve().parents[2]
RHO, LR = 0.5, 1e-3
# Adam's eps: with the default 1e-8, a gradient entry near zero moves its weight by up to lr * sign(g), so
# float noise of 1e-10 in g (micro-batches summed in another order than one batch) shows as 1e-5 in the
# weights. A larger eps bounds that amplification (lr * noise / eps) while SAM still moves weights by ~1e-3.
ADAM_EPS = 1e-4


def examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """n token sequences of different lengths; the first few labels are masked like a prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(10, 25, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(2, 8, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def args(tmp_path, batch: int, accum: int = 1, steps: int = 2, **kw) -> TrainingArguments:
    # constant LR, no warmup, no weight decay, no clipping, data in order: the reference does the same
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, max_steps=steps, learning_rate=LR,
                             lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                             optim="adamw_torch", adam_epsilon=ADAM_EPS, train_sampling_strategy="sequential", report_to="none",
                             save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, **kw)


def train(model, data, targs, **kw) -> SAMTrainer:
    pad = model.config.pad_token_id
    trainer = SAMTrainer(model=model, args=targs, train_dataset=data, data_collator=lambda f: collate(f, pad),
                         rho=RHO, **kw)
    trainer.train()
    return trainer


def reference(model, steps: list[list[dict]], optimizer="sam", autocast_dtype=None):
    """cfsam's own update, one optimizer step per entry of ``steps`` on its examples as ONE batch."""
    pad = model.config.pad_token_id
    # the Trainer's param groups (matrices / norm weights): the global norm sums over them in this order
    opt = build_optimizer(model, optimizer, lr=LR, weight_decay=0.0, rho=RHO, adaptive=False)
    for group in opt.param_groups:
        group["eps"] = ADAM_EPS
    model.train()
    logs = [optimizer_step(model, opt, [collate(batch, pad)], StepContext(autocast_dtype=autocast_dtype))
            for batch in steps]
    return model, logs


def max_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_one_step_equals_cfsam_sam(tiny, tmp_path):
    data = examples(8, tiny.model.config.vocab_size)
    trainer = train(copy.deepcopy(tiny.model), data, args(tmp_path, batch=4))
    ref, logs = reference(copy.deepcopy(tiny.model), [data[:4], data[4:]])
    adamw, _ = reference(copy.deepcopy(tiny.model), [data[:4], data[4:]], optimizer="adamw")
    diff = max_diff(trainer.model, ref)
    print("one process", diff, max_diff(trainer.model, adamw))
    assert diff < 1e-6
    assert max_diff(trainer.model, adamw) > 100 * max(diff, 1e-7)  # the test can tell SAM from AdamW
    history = [h for h in trainer.state.log_history if "sam_grad_norm" in h]
    assert [h["sam_grad_norm"] for h in history] == pytest.approx([r["grad_norm"] for r in logs], rel=1e-5)
    assert [h["sam_perturbation_norm"] for h in history] == pytest.approx([RHO, RHO], rel=1e-5)


def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch(tiny, tmp_path):
    """2 micro-batches of 2 = one batch of 4: the loss is the token mean over the whole step and e is built
    from the accumulated gradient (its norm is the one of the whole batch), not per micro-batch."""
    data = examples(8, tiny.model.config.vocab_size, seed=1)
    trainer = train(copy.deepcopy(tiny.model), data, args(tmp_path, batch=2, accum=2))
    ref, logs = reference(copy.deepcopy(tiny.model), [data[:4], data[4:]])
    adamw, _ = reference(copy.deepcopy(tiny.model), [data[:4], data[4:]], optimizer="adamw")
    diff = max_diff(trainer.model, ref)
    print("accumulation", diff, max_diff(trainer.model, adamw))
    history = [h for h in trainer.state.log_history if "sam_grad_norm" in h]
    assert [h["sam_grad_norm"] for h in history] == pytest.approx([r["grad_norm"] for r in logs], rel=1e-5)
    assert [h["grad_norm"] for h in history] == pytest.approx([r["sam_grad_norm"] for r in logs], rel=1e-5)
    assert diff < 1e-6


def test_bf16_autocast_equals_cfsam_sam(tiny, tmp_path):
    data = examples(8, tiny.model.config.vocab_size, seed=2)
    trainer = train(copy.deepcopy(tiny.model), data, args(tmp_path, batch=4, bf16=True))
    ref, _ = reference(copy.deepcopy(tiny.model), [data[:4], data[4:]], autocast_dtype=torch.bfloat16)
    assert max_diff(trainer.model, ref) < 1e-6


class FP16SAMTrainer(SAMTrainer):
    """accelerate gives CPUs no fp16 autocast and no GradScaler; switch both on, as on a GPU, so the
    fp16 path (pass 1 unscaled by hand, the Trainer's scaler on pass 2) runs here."""

    init_scale = 2.0 ** 16

    def train(self, *a, **kw):
        self.accelerator.native_amp = True
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=self.init_scale)
        return super().train(*a, **kw)


def test_fp16_with_a_loss_scaler_equals_cfsam_sam(tiny, tmp_path):
    data = examples(8, tiny.model.config.vocab_size, seed=3)
    pad = tiny.model.config.pad_token_id
    trainer = FP16SAMTrainer(model=copy.deepcopy(tiny.model), args=args(tmp_path, batch=4, fp16=True),
                             train_dataset=data, data_collator=lambda f: collate(f, pad), rho=RHO)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == FP16SAMTrainer.init_scale  # no overflow, no skip
    model = copy.deepcopy(tiny.model).train()
    opt = build_optimizer(model, "sam", lr=LR, weight_decay=0.0, rho=RHO, adaptive=False)
    for group in opt.param_groups:
        group["eps"] = ADAM_EPS
    ctx = StepContext(autocast_dtype=torch.float16, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    logs = [optimizer_step(model, opt, [collate(b, pad)], ctx) for b in (data[:4], data[4:])]
    history = [h for h in trainer.state.log_history if "sam_grad_norm" in h]
    # the logged norm is the unscaled one
    assert [h["sam_grad_norm"] for h in history] == pytest.approx([r["grad_norm"] for r in logs], rel=1e-5)
    assert max_diff(trainer.model, model) < 1e-6


def test_fp16_overflow_skips_the_step_and_leaves_the_weights(tiny, tmp_path):
    class Overflowing(FP16SAMTrainer):
        init_scale = 2.0 ** 100  # every fp16 backward overflows

    data = examples(4, tiny.model.config.vocab_size, seed=4)
    pad = tiny.model.config.pad_token_id
    trainer = Overflowing(model=copy.deepcopy(tiny.model), args=args(tmp_path, batch=4, steps=1, fp16=True),
                          train_dataset=data, data_collator=lambda f: collate(f, pad), rho=RHO)
    trainer.train()
    assert max_diff(trainer.model, tiny.model) == 0.0  # not perturbed, not stepped: bitwise the start
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 99  # lowered once, by the Trainer's own update
    assert not any("sam_grad_norm" in h for h in trainer.state.log_history)
