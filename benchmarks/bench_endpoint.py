"""What an end point's landscape and curvature cost, phase by phase, against their forward/backward floor.

    CFSAM_DATA_DIR=... .venv/bin/python benchmarks/bench_endpoint.py [--preset cpu]
        [--experiment metamathqa-adamw-lr0.0001-s1234-4of4] [--rows 2] [--repeats 3]

An end point's measurement adds ``runner.measure``'s landscape phase: the surfaces of ``landscape.flatness_of``
and ``curvature.curvature_of`` (SAM sharpness: a gradient and a loss; Hutchinson: ``hutchinson_probes`` Hessian-
vector products; power iteration: up to ``hessian_iters`` of them), on the batches ``runner.landscape_batches``
gives, with the preset's model (the base weights: the time does not depend on them), against a floor measured in
the same run:

- the **forward floor** F: the batches' real tokens at the decoder's inference forward rate, plus their labelled
  positions at the head's rate (``bench_eval``'s rates, 8 x 256 tokens);
- a surface point is one forward: grid^2 x seeds x F;
- a gradient is a forward and a backward, and the backward does about twice a forward's matmul work: 3 F;
- a Hessian-vector product (double backward) costs about two gradients (Pearlmutter 1994): 6 F.

First the units (a forward, a gradient, a Hessian-vector product) for each layout of the same examples, best of
``--repeats`` alternating: as the spec batches them (an HVP ``curvature.HVP_ROWS`` rows a pass), and longest first
in batches of each ``--rows`` (``heldout.by_length``), with the loss's and the HVP's difference from the first:
only the summation order moves. Then each phase, on the spec's batches as it ran before 2026-12-06 and as the
runner runs it now.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import resource

import torch

from bench_eval import forward_rate, head_rate
from cfsam.data.models import load_model
from cfsam.measurement import curvature, heldout, landscape
from cfsam.pipeline import specs
from cfsam.pipeline.presets import load_preset
from cfsam.pipeline.runner import landscape_batches
from cfsam.training.loss import targets_and_mask
from timing import Clock

GRADIENT_FORWARDS, HVP_FORWARDS = 3, 6  # the floor's counts, in forwards (the docstring)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--experiment", default="metamathqa-adamw-lr0.0001-s1234-4of4", help="an end point")
    parser.add_argument("--rows", default="2", help="rows of the by-length layouts to compare, e.g. 4,2,1")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of the units (best of)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one Hessian-vector product as the runner runs it: the ops' share of its time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not os.environ.get("CFSAM_DATA_DIR"):
        raise SystemExit("set CFSAM_DATA_DIR to the data mirror")
    exps = specs.expand(args.preset)
    spec = exps.get(args.experiment, {}).get("measure", {})
    if "landscape" not in spec:
        raise SystemExit(f"{args.experiment!r} is not an experiment of {args.preset} with a landscape")
    rows = [int(r) for r in args.rows.split(",")]
    ls = spec["landscape"]
    loaded = load_model(load_preset(args.preset)["model"])
    model = loaded.model.eval()
    batches = landscape_batches(spec, loaded.tokenizer)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    labelled = sum(int(targets_and_mask(b["labels"])[0].sum()) for b in batches)
    rate, h_rate = forward_rate(loaded), head_rate(loaded)
    f = real / rate + labelled / h_rate
    print(f"# {args.preset}/{args.experiment}: {loaded.name}, landscape on {ls['dataset']}: {ls['n_examples']} examples "
          f"in batches of {ls['batch_size']} ({real} real tokens, {labelled} labelled), grid {ls['grid']}, "
          f"seeds {ls['seeds']}, {ls['hessian_iters']} power iterations, {ls['hutchinson_probes']} probes; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"forward rate {rate:.0f} tokens/s (decoder, 8 x 256), head {h_rate:.0f} positions/s: "
          f"F = {f:.2f} s a forward of these batches")

    if args.profile:
        return profile_hvp(model, landscape_batches(spec, loaded.tokenizer, rows=curvature.hvp_rows(torch.device("cpu"))), f)

    # the units every phase is made of, for each layout of the same examples: as the spec batches them, and
    # longest first in batches of r rows (heldout.by_length), the Hessian-vector product r rows a pass. The
    # layouts alternate, best of --repeats each, so that drift and warm-up fall on all alike; they also warm
    # the allocator up for the phases below.
    grad = curvature.gradient(model, batches)[1]
    norm = math.sqrt(sum(float((g * g).sum()) for g in grad))
    v = [g / norm for g in grad]
    layouts = {f"as batched (HVP {curvature.HVP_ROWS} rows)": (batches, curvature.HVP_ROWS)}
    layouts |= {f"by length, {r} rows": (heldout.by_length(batches, r)[1], r) for r in rows}
    best = {name: [math.inf] * 3 for name in layouts}
    seen: dict[str, tuple] = {}
    default_rows = curvature.HVP_ROWS
    for _ in range(args.repeats):
        for name, (bs, r) in layouts.items():
            with Clock() as fwd:
                loss = heldout.mean_loss(model, bs)
            with Clock() as g:
                curvature.gradient(model, bs)
            curvature.HVP_ROWS = r
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            with Clock() as h:
                hv = curvature.hvp(model, bs, v)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            curvature.HVP_ROWS = default_rows
            best[name] = [min(x, y) for x, y in zip(best[name], (fwd.wall, g.wall, h.wall))]
            seen.setdefault(name, (loss, hv, peak, peak > before))
    print(f"\nthe units, in F (floors: forward 1, gradient {GRADIENT_FORWARDS}, HVP {HVP_FORWARDS}), by layout of the "
          f"same {ls['n_examples']} examples, best of {args.repeats} alternating:")
    ref_loss, reference = seen[next(iter(layouts))][:2]
    for name, (bs, _) in layouts.items():
        loss, hv, peak, new = seen[name]
        diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(hv, reference))
        fwd, g, h = (x / f for x in best[name])
        print(f"  {name:26s} {sum(b['input_ids'].numel() for b in bs):5d} tokens as run   forward {fwd:4.2f} F   "
              f"gradient {g:4.2f} F   HVP {h:5.2f} F   peak {peak / 2**20:4.1f} GB{' (new)' if new else '      '}   "
              f"loss {loss - ref_loss:+.1e}, HVP {diff:.1e} from the first")

    # the phase as the runner runs it (by length, HVP_ROWS rows a batch) and, side by side, as it ran before
    # (the spec's batches, the HVP cutting them into HVP_ROWS-row passes)
    rows_now = curvature.hvp_rows(torch.device("cpu"))
    for title, bs in {f"the phase on the spec's batches (before 2026-12-06; HVP {rows_now} rows a pass)": batches,
                      f"the phase as the runner runs it (by length, {rows_now} rows)":
                      landscape_batches(spec, loaded.tokenizer, rows=rows_now)}.items():
        t, counted = {}, {}
        with Clock() as c:
            landscape.flatness_of(model, bs, ls)
        t["surfaces"], counted["surfaces"] = c.wall, ls["grid"] ** 2 * len(ls["seeds"])
        with Clock() as c:
            curvature.sam_sharpness(model, bs)
        t["SAM sharpness"], counted["SAM sharpness"] = c.wall, GRADIENT_FORWARDS + 1
        with Clock() as c:
            curvature.hessian_trace(model, bs, probes=ls["hutchinson_probes"])
        t["Hutchinson"], counted["Hutchinson"] = c.wall, HVP_FORWARDS * ls["hutchinson_probes"]
        with Clock() as c:
            top = curvature.power_iteration(model, bs, iters=ls["hessian_iters"])
        t["power iteration"], counted["power iteration"] = c.wall, HVP_FORWARDS * top["iterations"]
        print(f"\n{title}:")
        for phase, s in t.items():
            floor = counted[phase] * f
            print(f"  {phase:16s} {s:7.1f} s   floor {floor:6.1f} s ({counted[phase]:3d} F)   "
                  f"{100 * floor / s:5.1f} % of floor")
        total, floor = sum(t.values()), sum(counted.values()) * f
        print(f"  {'the phase':16s} {total:7.1f} s   floor {floor:6.1f} s            {100 * floor / total:5.1f} % of floor")


def profile_hvp(model, batches, f: float) -> None:
    """Where one Hessian-vector product's time goes, by op (self time, torch.profiler), after one to warm up."""
    from torch.profiler import ProfilerActivity, profile

    v = [torch.randn_like(p) for p in model.parameters() if p.requires_grad]
    curvature.hvp(model, batches, v)
    with Clock() as c, profile(activities=[ProfilerActivity.CPU]) as prof:
        curvature.hvp(model, batches, v)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\none HVP as the runner runs it: {c.wall:.1f} s = {c.wall / f:.2f} F (floor {HVP_FORWARDS} F); "
          f"self time by op, the top 15:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {e.key:45s} {100 * e.self_cpu_time_total / total:5.1f} %   {e.count:6d} calls")
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))
    print(f"  matmuls (mm, bmm, addmm) {100 * matmul / total:.1f} % of the self time")


if __name__ == "__main__":
    main()
