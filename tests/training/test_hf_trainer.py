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
                             optim="adamw_torch", train_sampling_strategy="sequential", report_to="none",
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
