"""How a stage cuts its data into steps: how many per epoch and in all, the micro-batches of each rank, where
it saves snapshots, and each step's micro-batches in the data order of (seed, epoch)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cfsam.core.dist import Runtime
from cfsam.core.errors import UsageError
from cfsam.data import formatting


@dataclass
class Plan:
    """How a stage cuts its data into steps: per epoch, in all, per micro-batch, and where it saves snapshots."""
    steps_per_epoch: int
    total_steps: int
    micro: int                   # examples per micro-batch on each rank
    snapshot_at: dict[int, int]  # step -> snapshot index (the models saved along the run)


def plan_steps(n_examples: int, kw: dict, rt: Runtime) -> Plan:
    batch_size, grad_accum = kw["batch_size"], kw["grad_accum"]
    steps_per_epoch = n_examples // batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{n_examples} examples are fewer than one batch (batch_size={batch_size})")
    total_steps = max(1, math.ceil(kw["epochs"] * steps_per_epoch))
    if kw["max_steps"] is not None:
        total_steps = min(total_steps, kw["max_steps"])
    n_snap = kw["snapshots"]
    snapshot_at = {max(1, round(i * total_steps / n_snap)): i for i in range(1, n_snap)} if n_snap > 1 else {}
    return Plan(steps_per_epoch, total_steps, batch_size // (grad_accum * rt.world), snapshot_at)


class Batches:
    """A step's micro-batches on this rank. The data order is a function of (seed, epoch), so a resumed run
    sees the same batches; one order is held at a time."""

    def __init__(self, ds, kw: dict, rt: Runtime, plan: Plan, pad_id: int):
        self.ds, self.kw, self.rt, self.plan, self.pad_id = ds, kw, rt, plan, pad_id
        self.lengths = [len(x) for x in ds["input_ids"]] if kw["group_by_length"] else None
        self.orders: dict[int, torch.Tensor] = {}

    def at(self, step: int) -> tuple[list[dict], torch.Tensor, int]:
        """The micro-batches of ``step`` (on the run's device), their response-token count and the epoch."""
        kw, rt, micro, grad_accum = self.kw, self.rt, self.plan.micro, self.kw["grad_accum"]
        batch_size = kw["batch_size"]
        epoch, pos = divmod(step, self.plan.steps_per_epoch)
        if epoch not in self.orders:  # one order per epoch
            self.orders.clear()
            self.orders[epoch] = (
                torch.tensor(formatting.length_grouped_order(self.lengths, batch_size, kw["seed"], epoch))
                if kw["group_by_length"] else
                torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(kw["seed"] + epoch)))
        perm = self.orders[epoch]
        mine = perm[pos * batch_size:(pos + 1) * batch_size][rt.rank * micro * grad_accum:][:micro * grad_accum]
        micro_batches = []
        n_tokens = torch.zeros((), dtype=torch.long)
        for j in range(grad_accum):
            rows = self.ds[mine[j * micro:(j + 1) * micro].tolist()]
            feats = [{"input_ids": a, "labels": b} for a, b in zip(rows["input_ids"], rows["labels"])]
            mb = formatting.collate(feats, self.pad_id)
            n_tokens += mb["attention_mask"].sum()
            micro_batches.append({k: v.to(rt.device) for k, v in mb.items()})
        return micro_batches, n_tokens, epoch
