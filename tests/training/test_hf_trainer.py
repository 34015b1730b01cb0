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
from unittest import mock

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


def args(tmp_path, batch: int, accum: int = 1, steps: int = 2, optim: str = "adamw_torch", **kw) -> TrainingArguments:
    # constant LR, no warmup, no weight decay, no clipping, data in order: the reference does the same
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, max_steps=steps, learning_rate=LR,
                             lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                             optim=optim, adam_epsilon=ADAM_EPS, train_sampling_strategy="sequential", report_to="none",
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


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    """2 ranks x 2 micro-batches of 2 = one process on the global batch of 8 (norm of the all-reduced,
    accumulated gradient; same micro-batches in both passes)."""
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "tests" / "dist" / "hf_sam_ddp.py"), str(out)], check=True, env=env, timeout=600)
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["ddp"] == "DistributedDataParallel"
    assert r["sam_grad_norm"] == pytest.approx(r["reference_grad_norm"], rel=1e-5)
    assert r["sam_perturbation_norm"] == pytest.approx([RHO, RHO], rel=1e-5)
    assert r["max_diff"] < 1e-6 < 1e-3 * r["moved"]


def test_deepspeed_is_refused(tiny, tmp_path):
    ds = {"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    # TrainingArguments(deepspeed=...) sets ACCELERATE_USE_DEEPSPEED, and accelerate's state is per process:
    # put both back so the other tests train without DeepSpeed
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    with mock.patch.dict(os.environ):
        try:
            with pytest.raises(ValueError, match=r"does not support DeepSpeed.*Allowed: one process, DataParallel or DDP"):
                SAMTrainer(model=copy.deepcopy(tiny.model), args=args(tmp_path, batch=2, deepspeed=ds),
                           train_dataset=examples(2, 100), rho=RHO)
        finally:
            unset_hf_deepspeed_config()
            AcceleratorState._reset_state(reset_partial_state=True)


def test_fsdp_and_bad_arguments_are_refused(tiny, tmp_path):
    class UnderFSDP(SAMTrainer):
        # accelerate ignores an FSDP plugin on CPU; set the flag Trainer.__init__ sets on GPUs
        def _sam_refuse_unsupported(self):
            self.is_fsdp_enabled = True
            super()._sam_refuse_unsupported()

    data = examples(2, 100)
    with pytest.raises(ValueError, match=r"does not support FSDP: the gradients are shards.*rho\*sqrt\(world_size\)\. Allowed"):
        UnderFSDP(model=copy.deepcopy(tiny.model), args=args(tmp_path, batch=2), train_dataset=data, rho=RHO)
    with pytest.raises(ValueError, match=r"does not support optim='lomo': it steps inside backward"):
        SAMTrainer(model=copy.deepcopy(tiny.model), args=args(tmp_path, batch=2, optim="lomo"), train_dataset=data)
    with pytest.raises(ValueError, match=r"rho > 0, got rho=0"):
        SAMTrainer(model=copy.deepcopy(tiny.model), args=args(tmp_path, batch=2), train_dataset=data, rho=0)
    model = copy.deepcopy(tiny.model)
    trainer = SAMTrainer(model=model, args=args(tmp_path, batch=2), train_dataset=data,
                         optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(TypeError, match=r"optimizers=\(SGD, \.\.\.\); pass a cfsam.core.sam.SAM"):
        trainer.train()


def test_mixin_with_trl_sft_trainer(tiny, tmp_path):
    """SAMTrainerMixin on TRL's SFTTrainer (its own loss path): the same update as cfsam's SAM step, and
    pass 2 left out of SFTTrainer's token count."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from cfsam.training.hf_trainer import SAMTrainerMixin

    class SAMSFTTrainer(SAMTrainerMixin, trl.SFTTrainer):
        pass

    data = examples(8, tiny.model.config.vocab_size, seed=6)
    pad = tiny.model.config.pad_token_id
    base = args(tmp_path, batch=2, accum=2).to_dict()
    keep = ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "learning_rate",
            "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "adam_epsilon",
            "train_sampling_strategy", "report_to", "save_strategy", "logging_steps", "use_cpu", "disable_tqdm", "seed")
    # SFTConfig defaults to bf16 and gradient checkpointing: fp32 here, like the reference
    config = trl.SFTConfig(**{k: base[k] for k in keep}, bf16=False, gradient_checkpointing=False, max_length=None,
                           dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    trainer = SAMSFTTrainer(model=copy.deepcopy(tiny.model), args=config, train_dataset=Dataset.from_list(data),
                            processing_class=tiny.tokenizer, data_collator=lambda f: collate(f, pad), rho=RHO)
    trainer.train()
    ref, logs = reference(copy.deepcopy(tiny.model), [data[:4], data[4:]])
    history = [h for h in trainer.state.log_history if "sam_grad_norm" in h]
    assert [h["sam_grad_norm"] for h in history] == pytest.approx([r["grad_norm"] for r in logs], rel=1e-5)
    assert max_diff(trainer.model, ref) < 1e-6
    assert history[0]["num_tokens"] == sum(len(d["input_ids"]) for d in data[:4])
