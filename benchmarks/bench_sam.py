"""SAM against AdamW on the same model and batch: median step time and peak memory, and their ratios.

    .venv/bin/python benchmarks/bench_sam.py [--model smollm2-135m] [--batch 2] [--seq 128] [--steps 4]

Both optimizers run ``cfsam.training.step.optimizer_step`` (what the trainer runs, fp32, clipping at 1.0) on
one fixed batch of random tokens (the cost does not depend on which tokens).

* Time: one process holds two copies of the model with the same weights and alternates AdamW and
  SAM steps (after one warm-up step each), so machine load drifts through both alike; the median
  wall time per step of each is reported. Two forward/backward passes make 2x the floor.
* Memory: the peak resident set size (``ru_maxrss``) of a fresh process per optimizer that loads the
  model, builds the batch and takes ``--mem-steps`` steps. SAM's extra peak over AdamW is the
  memory SAM adds (its saved copy of the weights); it is compared with the parameter bytes.

The last printed line is the summary.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from cfsam.data import models
from cfsam.training.step import StepContext, build_optimizer, optimizer_step

LR, RHO = 1e-5, 2.0


def make_batch(vocab: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def worker(args) -> None:
    """Fresh process: peak RSS of load + batch + steps for one optimizer, printed as JSON."""
    model = models.load_model(args.model).model
    batch = make_batch(model.config.vocab_size, args.batch, args.seq)
    with open("/proc/self/statm") as f:
        rss_loaded = int(f.read().split()[1]) * resource.getpagesize()
    opt = build_optimizer(model, args.worker, LR, 0.0, RHO, False)
    for _ in range(args.mem_steps):
        optimizer_step(model, opt, [batch], StepContext(max_grad_norm=1.0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss_loaded": rss_loaded, "peak_rss": peak}))


def peak_memory(args, optimizer: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", optimizer, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--mem-steps", str(args.mem_steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def step_times(args) -> tuple[dict, int]:
    base = models.load_model(args.model).model
    n_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    runs = {}
    for name in ("adamw", "sam"):
        model = copy.deepcopy(base)
        runs[name] = (model, build_optimizer(model, name, LR, 0.0, RHO, False), [])
    del base
    batch = make_batch(runs["adamw"][0].config.vocab_size, args.batch, args.seq)
    for i in range(args.steps + 1):  # step 0 of each is a warm-up (allocates AdamW's state)
        for name, (model, opt, times) in runs.items():
            t = time.perf_counter()
            rec = optimizer_step(model, opt, [batch], StepContext(max_grad_norm=1.0))
            dt = time.perf_counter() - t
            if i:
                times.append(dt)
            print(f"  step {i} {name:5s} {dt:6.2f} s  loss {rec['loss']:.4f}"
                  + (f"  perturbation {rec['perturbation_norm']:.3f}" if rec["perturbation_norm"] else ""), flush=True)
    return {name: times for name, (_, _, times) in runs.items()}, n_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each optimizer (after a warm-up)")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps of each memory process")
    ap.add_argument("--worker", choices=("adamw", "sam"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    print(f"model {args.model}, batch {args.batch} x {args.seq} tokens, fp32, torch threads {torch.get_num_threads()}")
    mem = {name: peak_memory(args, name) for name in ("adamw", "sam")}
    times, n_bytes = step_times(args)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{'optimizer':10s} {'median step s':>14s} {'peak RSS MB':>12s} {'RSS after load MB':>18s}")
    for name in ("adamw", "sam"):
        m = mem[name]
        print(f"{name:10s} {med[name]:14.2f} {m['peak_rss'] / 2**20:12.0f} {m['rss_loaded'] / 2**20:18.0f}")
    extra = mem["sam"]["peak_rss"] - mem["adamw"]["peak_rss"]
    print(f"parameter bytes: {n_bytes / 2**20:.0f} MB; peak memory: process max RSS (ru_maxrss) of one fresh "
          "process per optimizer")
    print(f"SUMMARY sam/adamw on {args.model} ({args.batch}x{args.seq}): step time ratio "
          f"{med['sam'] / med['adamw']:.2f} (median {med['sam']:.2f} s vs {med['adamw']:.2f} s; target <= 2.05), "
          f"peak RSS ratio {mem['sam']['peak_rss'] / mem['adamw']['peak_rss']:.2f}, SAM extra peak "
          f"{extra / 2**20:.0f} MB = {extra / n_bytes:.2f} x parameter bytes (target <= 1.10)")


if __name__ == "__main__":
    main()
