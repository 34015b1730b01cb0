"""Training throughput at the study's batch shape: AdamW, SAM and SAM every k, side by side.

    .venv/bin/python benchmarks/bench_train.py [--model smollm2-135m] [--batch 8] [--max-length 256]
        [--steps 2] [--sam-every 4] [--precisions fp32,bf16] [--compile] [--no-memory] [--no-profile]
        [--hf-loss] [--head-reps 5]

What runs is the trainer's own update, ``cfsam.training.step.optimizer_step`` (clipping at 1.0), in each
of ``--precisions``: fp32, and bf16 autocast as ``precision: bf16`` trains (fp32 master weights, optimizer
state and SAM perturbation; the matmuls in bf16). ``--compile`` adds AdamW in fp32 with every decoder layer
under ``torch.compile`` (inductor), the lever for the element-wise share. Batches are real Alpaca ones
(``build_dataset`` + ``collate``, response-only labels) in the trainer's order: length-grouped, as the ``cpu`` study trains (``--order random``: the order without ``group_by_length``).

* Time: one process holds one model copy per optimizer (same weights) and alternates them step by
  step, so machine load drifts through all alike; wall and process CPU seconds are both taken, and
  the ratios use CPU seconds (on a shared machine wall time swings several-fold within minutes); after one warm-up update each, ``--steps`` updates
  of AdamW and SAM are timed, and one whole cycle (k updates: k-1 plain, one SAM) of SAM every k, whose
  mean is its amortised cost. With ``--hf-loss`` also ``adamw-hfloss``, AdamW with transformers' loss
  (the head and a log-softmax on every position), the cost before ``cfsam.training.loss``.
* Head and loss alone: that difference without the decoder around it, alternating A/B repetitions.
* FLOP/s: useful work only: 6 x (non-embedding parameters) per real (unpadded) token, 6 x (head
  parameters) per labelled token, and the causal attention products 6 x layers x width x sum(L^2)
  per sequence, times the passes an update makes; against the matmul rate of a large ``torch.mm`` in the
  variant's precision, measured in the same run (before and after; the larger is the reference).
* Memory: the peak resident set (``ru_maxrss``) of a fresh process per optimizer that loads the model,
  builds the epoch's longest batch and takes one update (SAM every k's first update is a SAM one: its peak is SAM's).
* Padding: the fraction of padded positions of the batches in the trainer's random order and in the
  length-grouped order (``formatting.length_grouped_order``), over ``--padding-examples`` examples.
* ``torch.profiler`` on one AdamW update: the operators that take the time, and from them what stands
  between AdamW and the large-mm rate (the matmuls' share of the time and their own rate at the model's
  shapes; attention; the element-wise rest).

On a shared CPU the times are noisy: compare ratios from one run, not numbers across runs.
The last printed line is the summary.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from cfsam.core import memory
from cfsam.core.precision import auto_precision
from cfsam.data import formatting, models
from cfsam.training import step as train_step
from cfsam.training.step import StepContext, build_optimizer, optimizer_step

LR, RHO, SEED = 1e-5, 2.0, 1234
N_TRAIN = 320  # the cpu study's stage-1 set: batches come from its order


def batches(tokenizer, batch: int, max_length: int, n_batches: int, order: str = "grouped",
            n_train: int = N_TRAIN) -> list[dict]:
    """The first n_batches batches of the trainer's (seed, epoch 0) order over the study's stage-1 set:
    length-grouped (``group_by_length``, as the ``cpu`` study trains) or random."""
    n = max(n_train, batch * n_batches)
    ds = formatting.build_dataset("alpaca", tokenizer, n=n, seed=SEED, max_length=max_length)
    if order == "grouped":
        perm = formatting.length_grouped_order([len(x) for x in ds["input_ids"]], batch, SEED, 0)
    else:
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SEED)).tolist()
    rows = [ds[i] for i in perm[:batch * n_batches]]
    return [formatting.collate(rows[s:s + batch], tokenizer.pad_token_id) for s in range(0, len(rows), batch)]


def longest_batch(tokenizer, batch: int, max_length: int, order: str = "grouped") -> dict:
    """The batch of the epoch with the most positions: what sets a training run's peak memory."""
    return max(batches(tokenizer, batch, max_length, N_TRAIN // batch, order), key=lambda b: b["input_ids"].numel())


def padding_fraction(lengths: list[int], order: list[int], batch: int) -> float:
    padded = sum(max(lengths[i] for i in order[s:s + batch]) * len(order[s:s + batch])
                 for s in range(0, len(order), batch))
    return 1 - sum(lengths) / padded


def padding_report(tokenizer, batch: int, max_length: int, n: int) -> dict:
    ds = formatting.build_dataset("alpaca", tokenizer, n=n, seed=SEED, max_length=max_length)
    lengths = [len(x) for x in ds["input_ids"]]
    labelled = sum(sum(1 for t in y[1:] if t != -100) for y in ds["labels"])
    random_order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED)).tolist()
    grouped = formatting.length_grouped_order(lengths, batch, SEED, 0)
    return {"n": n, "mean_length": sum(lengths) / n, "labelled_of_real": labelled / sum(lengths),
            "random": padding_fraction(lengths, random_order, batch),
            "grouped": padding_fraction(lengths, grouped, batch)}


def useful_flops(cfg, n_params: int, mb: dict) -> float:
    """Useful FLOPs of one forward+backward pass over a micro-batch (see the module docstring)."""
    head = cfg.vocab_size * cfg.hidden_size
    body = n_params - head * (1 if cfg.tie_word_embeddings else 2)  # the embedding lookup is not a product
    lengths = mb["attention_mask"].sum(1).double()
    labelled = float((mb["labels"][:, 1:] != -100).sum())
    attn = 6 * cfg.num_hidden_layers * cfg.hidden_size * float((lengths ** 2).sum())
    return 6 * body * float(lengths.sum()) + 6 * head * labelled + attn


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
OPTIMIZERS = ("adamw", "sam", "sam-every")


def variant(name: str) -> tuple[str, str, bool]:
    """A timed variant's (optimizer, precision, compiled): ``sam-every-bf16`` is SAM every k in bf16."""
    compiled = name.endswith("-compiled")
    name = name.removesuffix("-compiled")
    precision = "bf16" if name.endswith("-bf16") else "fp32"
    return name.removesuffix("-bf16"), precision, compiled


def matmul_rate(n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * n ** 3 / (time.perf_counter() - t)


def hf_loss(model, input_ids, attention_mask, labels, **_):
    """transformers' loss (logits and log-softmax on every position) as a sum: the old training loss."""
    n = (labels[:, 1:] != -100).sum()
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=1).loss, n


def head_and_loss_times(base, mb, reps: int) -> dict[str, float]:
    """Median seconds of the head and cross-entropy alone (forward and backward, from the same hidden
    states) the way transformers does it (every position) and the way ``cfsam.training.loss`` does
    (labelled positions, checkpointed chunks). The decoder before them is the same in both, so this is
    the whole difference between the two losses, in short alternating runs that load swings disturb less."""
    from cfsam.training.loss import head_loss, targets_and_mask

    with torch.no_grad():
        hidden = base.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).last_hidden_state
    mask, targets = targets_and_mask(mb["labels"])
    ways = {
        "transformers": lambda h: base.loss_function(logits=base.lm_head(h), labels=mb["labels"],
                                                     vocab_size=base.config.vocab_size, num_items_in_batch=1),
        "labelled-only": lambda h: head_loss(base.lm_head, h[mask], targets),
    }
    times = {k: [] for k in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            h = hidden.detach().requires_grad_(True)
            t = time.perf_counter()
            fn(h).backward()
            times[name].append(time.perf_counter() - t)
    base.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}


def make_optimizer(model, name: str, every: int):
    opt = variant(name)[0]
    kind = "sam" if opt.startswith("sam") else "adamw"
    return build_optimizer(model, kind, LR, 0.0, RHO, False, sam_every=every if opt == "sam-every" else 1)


def worker(args) -> None:
    """Fresh process: peak RSS of load + batch + one update of one optimizer, printed as JSON."""
    loaded = models.load_model(args.model)
    mb = longest_batch(loaded.tokenizer, args.batch, args.max_length, args.order)
    rss_loaded = memory.resident_bytes()
    opt = make_optimizer(loaded.model, args.worker, args.sam_every)
    optimizer_step(loaded.model, opt, [mb], StepContext(max_grad_norm=1.0))
    print(json.dumps({"rss_loaded": rss_loaded, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def peak_memory(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--batch", str(args.batch),
           "--max-length", str(args.max_length), "--sam-every", str(args.sam_every), "--order", args.order]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def timed_update(model, opt, mb, name: str) -> float:
    real = train_step.summed_loss
    if name == "adamw-hfloss":
        train_step.summed_loss = hf_loss
    try:
        t, c = time.perf_counter(), time.process_time()
        optimizer_step(model, opt, [mb], StepContext(max_grad_norm=1.0, autocast_dtype=AUTOCAST[variant(name)[1]]))
        return time.perf_counter() - t, time.process_time() - c
    finally:
        train_step.summed_loss = real


def step_times(args, base, data: list[dict], names: list[str]) -> dict[str, list[tuple[float, float, int, dict]]]:
    """Per optimizer: (wall seconds, CPU seconds, passes, micro-batch) of each timed update."""
    runs, shared = {}, {}
    for name in names:
        compiled = variant(name)[2]
        # one model (and its gradients) for every variant alike: an update's time does not depend on the weights'
        # values, and a copy per variant of a 268M-parameter model did not fit in 24 GB; optimizer states are own
        if compiled not in shared:
            shared[compiled] = copy.deepcopy(base)
            if compiled:  # shapes vary batch to batch: one dynamic graph per layer, compiled at update 0
                for layer in shared[compiled].model.layers:
                    layer.compile(dynamic=True)
        model = shared[compiled]
        runs[name] = (model, make_optimizer(model, name, args.sam_every), [])
    n_timed = {name: args.sam_every if variant(name)[0] == "sam-every" else args.steps for name in names}
    # update 0 of each is a warm-up (it allocates AdamW's state); a compiled variant's first two (update 1 still
    # recompiled its layers for the dynamic sequence length on 2026-12-04)
    warm = {name: 2 if variant(name)[2] else 1 for name in names}
    for i in range(max(warm[n] + n_timed[n] for n in names)):
        for name, (model, opt, times) in runs.items():
            if i >= warm[name] + n_timed[name]:
                continue
            passes = 2 if getattr(opt, "is_sam_step", False) else 1
            mb = data[i % len(data)]
            dt, cpu = timed_update(model, opt, mb, name)
            if i >= warm[name]:
                times.append((dt, cpu, passes, mb))
            print(f"  update {i} {name:16s} {dt:7.2f} s wall {cpu:7.2f} s CPU ({passes} pass{'es' if passes == 2 else ''})",
                  flush=True)
    return {name: times for name, (_, _, times) in runs.items()}


def profile_update(base, mb) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(base)
    opt = make_optimizer(model, "adamw", 1)
    optimizer_step(model, opt, [mb], StepContext(max_grad_norm=1.0))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimizer_step(model, opt, [mb], StepContext(max_grad_norm=1.0))
    print("\ntorch.profiler, one AdamW update (self CPU time, top operators):")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12))
    total = sum(e.self_cpu_time_total for e in averages)
    share = {"mm": sum(e.self_cpu_time_total for e in averages if e.key in ("aten::mm", "aten::addmm", "aten::bmm")),
             "attention": sum(e.self_cpu_time_total for e in averages if "scaled_dot_product" in e.key)}
    return {k: v / total for k, v in share.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed updates of AdamW and SAM (after a warm-up)")
    ap.add_argument("--sam-every", type=int, default=4, help="k of SAM every k (one whole cycle is timed)")
    ap.add_argument("--order", default="grouped", choices=["grouped", "random"],
                    help="batches in the length-grouped order the study trains in, or the random one")
    ap.add_argument("--padding-examples", type=int, default=2000)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--hf-loss", action="store_true", help="also time AdamW updates with transformers' loss")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated, of fp32 and bf16 (autocast)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help=f"comma-separated, of {', '.join(OPTIMIZERS)} (each keeps its own optimizer state)")
    ap.add_argument("--compile", action="store_true", help="also time fp32 AdamW with torch.compile'd decoder layers")
    ap.add_argument("--head-reps", type=int, default=5, help="alternating repetitions of the head+loss timing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    precisions = args.precisions.split(",")
    if not precisions or set(precisions) - set(AUTOCAST):
        ap.error(f"--precisions {args.precisions!r}: allowed are {', '.join(AUTOCAST)}, comma-separated")
    optimizers = args.optimizers.split(",")
    if "adamw" not in optimizers or set(optimizers) - set(OPTIMIZERS):
        ap.error(f"--optimizers {args.optimizers!r}: allowed are {', '.join(OPTIMIZERS)}, comma-separated, with "
                 "adamw among them (the reference)")

    loaded = models.load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    cfg = base.config
    n_params = sum(p.numel() for p in base.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    print(f"model {args.model} ({n_params / 1e6:.1f} M parameters), batch {args.batch} x <= {args.max_length} "
          f"tokens of Alpaca ({args.order} order), {'/'.join(precisions)} (this machine's auto precision: "
          f"{auto_precision()}), torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    pad = padding_report(tok, args.batch, args.max_length, args.padding_examples)
    print(f"padding over {pad['n']} examples (mean length {pad['mean_length']:.0f}; labelled "
          f"{pad['labelled_of_real']:.0%} of real tokens): random order {pad['random']:.1%} of positions, "
          f"length-grouped {pad['grouped']:.1%}")
    names = [o + ("" if p == "fp32" else f"-{p}") for p in precisions for o in optimizers]
    names += (["adamw-compiled"] if args.compile else []) + (["adamw-hfloss"] if args.hf_loss else [])
    data = batches(tok, args.batch, args.max_length, 2 + max(args.steps, args.sam_every), args.order)
    head = head_and_loss_times(base, data[0], args.head_reps)
    print(f"head + cross-entropy, forward and backward, batch 0 (median of {args.head_reps}): transformers "
          f"{head['transformers']:.2f} s, labelled positions only {head['labelled-only']:.2f} s")
    mem = {} if args.no_memory else {name: peak_memory(args, name) for name in ("adamw", "sam") if name in optimizers}
    peak = {p: matmul_rate(dtype=AUTOCAST[p] or torch.float32) for p in precisions}
    times = step_times(args, base, data, names)
    peak = {p: max(r, matmul_rate(dtype=AUTOCAST[p] or torch.float32)) for p, r in peak.items()}
    peak_mm = peak.get("fp32", max(peak.values()))
    shares = {} if args.no_profile or "fp32" not in precisions else profile_update(base, data[0])

    print("\nmatmul rate (2048^3 torch.mm): " + ", ".join(f"{p} {r / 1e9:.1f} GFLOP/s" for p, r in peak.items()))
    print(f"{'optimizer':16s} {'wall s/update':>14s} {'CPU s/update':>13s} {'tokens/s':>9s} {'useful GFLOP/s':>15s} "
          f"{'% of mm':>8s}")
    # CPU seconds per unit of one-pass work: the updates of each optimizer saw different batches, and
    # process CPU time is less disturbed than wall time by other jobs on a shared machine
    per = {}
    for name, rows in times.items():
        secs, cpu = sum(r[0] for r in rows), sum(r[1] for r in rows)
        tokens = sum(int(mb["attention_mask"].sum()) for *_, mb in rows)
        flops = sum(p * useful_flops(cfg, n_params, mb) for _, _, p, mb in rows)
        per[name] = cpu / sum(useful_flops(cfg, n_params, mb) for *_, mb in rows)
        print(f"{name:16s} {secs / len(rows):14.2f} {cpu / len(rows):13.2f} {tokens / secs:9.1f} "
              f"{flops / secs / 1e9:15.1f} {flops / secs / peak[variant(name)[1]]:8.1%}")
    print("(tokens/s and FLOP/s on wall time; tokens/s counts an update's real tokens once whatever its passes; "
          "the ratios below are CPU seconds per unit of one-pass work)")
    if shares and "adamw" in times:
        # what stands between AdamW and the large-mm rate: the matmuls' own speed at the model's shapes,
        # and the time outside them (the profiled update's share of self CPU time)
        rows = times["adamw"]
        secs = sum(r[0] for r in rows)
        adamw_rate = sum(useful_flops(cfg, n_params, mb) for *_, mb in rows) / secs
        mm_rate = adamw_rate / shares["mm"]
        print(f"AdamW at {adamw_rate / peak_mm:.1%} of the large-mm rate: matmuls take {shares['mm']:.1%} of an "
              f"update's CPU time and run at about {mm_rate / 1e9:.0f} GFLOP/s ({mm_rate / peak_mm:.0%} of it) at the "
              f"model's shapes; attention takes {shares['attention']:.1%}, element-wise and optimizer ops the "
              f"{1 - shares['mm'] - shares['attention']:.1%} left")
    if len(mem) == 2:
        extra = mem["sam"]["peak_rss"] - mem["adamw"]["peak_rss"]
        print(f"peak RSS: adamw {mem['adamw']['peak_rss'] / 2**20:.0f} MB, sam {mem['sam']['peak_rss'] / 2**20:.0f} MB; "
              f"SAM extra {extra / 2**20:.0f} MB = {extra / n_bytes:.2f} x parameter bytes ({n_bytes / 2**20:.0f} MB)")
    rel = lambda a, b: per[a] / per[b] if a in per and b in per else float("nan")  # noqa: E731
    fast = []
    if {"fp32", "bf16"} <= set(precisions):
        fast.append("bf16 autocast against fp32: " + ", ".join(f"{o} {rel(o, o + '-bf16'):.2f}x faster"
                                                               for o in optimizers))
    if args.compile:
        fast.append(f"AdamW with torch.compile'd layers {rel('adamw', 'adamw-compiled'):.2f}x faster")
    if "adamw" not in per:  # one precision only: its own variants are the reference
        per = {variant(k)[0] if not k.endswith("compiled") else k: v for k, v in per.items()}
    hf = f", AdamW with transformers' loss {per['adamw-hfloss'] / per['adamw']:.2f}" if "adamw-hfloss" in per else ""
    hf += f"; head+loss labelled-only/transformers {head['labelled-only'] / head['transformers']:.2f}"
    vs = [f"SAM {per['sam'] / per['adamw']:.2f}"] if "sam" in per else []
    vs += [f"SAM every {args.sam_every} {per['sam-every'] / per['adamw']:.2f} (amortised over a cycle; target <= 1.3)"
           ] if "sam-every" in per else []
    print(f"SUMMARY {args.model} {args.batch}x{args.max_length}: per update vs AdamW: {', '.join(vs)}{hf}; "
          f"padding {pad['random']:.1%} -> {pad['grouped']:.1%} length-grouped" + "".join(f"; {x}" for x in fast))


if __name__ == "__main__":
    main()
