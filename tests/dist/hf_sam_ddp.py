"""SAMTrainer under 2-process DDP (gloo, CPU) against one process, for tests/training/test_hf_trainer.py.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/hf_sam_ddp.py OUT.json``
trains the tiny random Llama for 2 optimizer steps with 2 micro-batches of 2 per rank (a global batch of 8),
and every rank computes cfsam's own SAM step on each global batch as ONE batch in one process. Rank 0 writes
the largest weight difference and the logged norms of both to OUT.json.
"""
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
from transformers import TrainingArguments

from cfsam.data.formatting import collate
from cfsam.data.models import load_model
from cfsam.training.hf_trainer import SAMTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from test_hf_trainer import examples  # noqa: E402  (the same synthetic sequences as the one-process tests)
from cfsam.training.step import StepContext, build_optimizer, optimizer_step

RHO, LR, ADAM_EPS = 0.5, 1e-3, 1e-4  # as in test_hf_trainer.py (why eps: see there)
PER_RANK, ACCUM, STEPS = 2, 2, 2


def main(out_path: str) -> None:
    tiny = load_model("tiny").model
    pad = tiny.config.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=PER_RANK,
                                  gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=LR,
                                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                                  optim="adamw_torch", adam_epsilon=ADAM_EPS, train_sampling_strategy="sequential",
                                  report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                                  disable_tqdm=True, seed=0, ddp_backend="gloo",
                                  ddp_find_unused_parameters=False)
        world = targs.world_size
        global_batch = PER_RANK * ACCUM * world
        data = examples(global_batch * STEPS, tiny.config.vocab_size, seed=5)
        trainer = SAMTrainer(model=copy.deepcopy(tiny), args=targs, train_dataset=data,
                             data_collator=lambda f: collate(f, pad), rho=RHO)
        trainer.train()
    # the reference: one process, each global batch (the 8 consecutive examples the ranks share) as one batch
    ref = copy.deepcopy(tiny).train()
    opt = build_optimizer(ref, "sam", lr=LR, weight_decay=0.0, rho=RHO, adaptive=False)
    for group in opt.param_groups:
        group["eps"] = ADAM_EPS
    logs = [optimizer_step(ref, opt, [collate(data[i:i + global_batch], pad)], StepContext())
            for i in range(0, len(data), global_batch)]
    model = trainer.accelerator.unwrap_model(trainer.model)
    history = [h for h in trainer.state.log_history if "sam_grad_norm" in h]
    result = {
        "world_size": dist.get_world_size(),
        "ddp": type(trainer.model_wrapped).__name__,
        "max_diff": max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())),
        "moved": max((p - q).abs().max().item() for p, q in zip(model.parameters(), tiny.parameters())),
        "sam_grad_norm": [h["sam_grad_norm"] for h in history],
        "sam_perturbation_norm": [h["sam_perturbation_norm"] for h in history],
        "reference_grad_norm": [r["grad_norm"] for r in logs],
    }
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
