"""What one frontier point's measurement costs, phase by phase, against its forward-token floor.

    CFSAM_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_measure.py [--preset cpu] [--bf16]

The measurement of a frontier point (``runner.measure`` without a landscape): held-out losses on each set of the
preset's frontier (per example) and the frontier's eval suite, on the preset's model (the base weights: the time
does not depend on them). Side by side in one run, A-B-A against drifting load:
- held-out losses as the seeded batches come (``row_losses`` on each given batch: the path before 2026-12-04)
  and as ``heldout.per_example_losses`` runs them now (longest first, batches of similar lengths), with the
  largest per-example difference between the two;
- eval through the harness (no result cache).
The floor of each phase is the tokens it must run (held-out: the examples' real tokens; eval: the harness's
packed rows, shared prefixes once) at the decoder's inference forward rate, measured in the same run; the floor
*with head* adds the positions the head must score (held-out: the labelled ones; eval: every continuation token)
at the head's rate, measured in the same run too (Gemma 3's 262k-token head is most of its parameters). With
``--bf16`` every phase runs under bf16 autocast too (what a preset that trains in bf16 measures in).
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

from bench_eval import forward_rate, head_rate, scored_tokens
from cfsam.data.models import load_model
from cfsam.evaluation import harness, tasks
from cfsam.measurement import heldout
from cfsam.pipeline import specs
from cfsam.pipeline.presets import load_preset
from cfsam.training.loss import row_losses, targets_and_mask
from timing import Clock

TARGET_S = 60.0  # issue 29: a frontier point's measurement


def as_batched(model, batches) -> list[tuple[float, int]]:
    """The held-out path before 2026-12-04: each seeded batch as it comes, padding and all."""
    out = []
    with torch.inference_mode():
        for b in batches:
            sums, counts = row_losses(model, b["input_ids"], b["attention_mask"], b["labels"])
            out += zip(sums.double().tolist(), counts.tolist())
    return out


def phases(loaded, spec: dict, sets: dict) -> dict:
    """Seconds of each phase and the held-out losses both ways."""
    model = loaded.model.eval()
    t = {}
    with Clock() as c:
        before = [as_batched(model, b) for b in sets.values()]
    t["held-out, as batched"] = c.wall
    with Clock() as c:
        after = [heldout.per_example_losses(model, b) for b in sets.values()]
    t["held-out, by length"] = c.wall
    with Clock() as c:
        again = [as_batched(model, b) for b in sets.values()]
    t["held-out, as batched"] = (t["held-out, as batched"] + c.wall) / 2
    ev = spec["eval"]
    with Clock() as c:
        harness.evaluate(loaded, ev["tasks"], limit=ev["limit"], seed=ev["seed"], stratify=bool(ev.get("stratified")),
                         use_cache=False, progress=False)
    t["eval"] = c.wall
    gap = max(abs(s / max(n, 1) - s2 / max(n2, 1)) for b, a in zip(before + again, after + after)
              for (s, n), (s2, n2) in zip(b, a))
    return {"seconds": t, "gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--experiment", default="frontier-stage1", help="whose measurement spec (its landscape left out)")
    parser.add_argument("--bf16", action="store_true", help="every phase also under bf16 autocast")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not os.environ.get("CFSAM_DATA_DIR"):
        raise SystemExit("set CFSAM_DATA_DIR to the data mirror")
    exps = specs.expand(args.preset)
    if args.experiment not in exps:
        raise SystemExit(f"{args.experiment!r} is not an experiment of {args.preset}")
    exp = exps[args.experiment]
    spec = exp["measure"]
    loaded = load_model(load_preset(args.preset)["model"])
    h = spec["heldout"]
    sets = {ds: heldout.heldout_batches(ds, loaded.tokenizer, n_examples=h["n"], batch_size=heldout.MEASURE_BATCH,
                                        max_length=h["max_length"], seed=h["seed"]) for ds in h["datasets"]}
    real = sum(int(b["attention_mask"].sum()) for bs in sets.values() for b in bs)
    padded = sum(b["input_ids"].numel() for bs in sets.values() for b in bs)
    labelled = sum(int(targets_and_mask(b["labels"])[0].sum()) for bs in sets.values() for b in bs)
    ev = spec["eval"]
    planned = [scored_tokens(loaded, tasks.load_items(t, limit=ev["limit"], seed=ev["seed"],
                                                      stratify=bool(ev.get("stratified")))[0]) for t in ev["tasks"]]
    eval_tokens, eval_positions = (sum(x) for x in zip(*planned))
    print(f"# {args.preset}/{args.experiment}: {loaded.name}, held-out {h['n']} examples on {', '.join(sets)} "
          f"({real} real tokens, {padded} as batched, {labelled} scored), eval {', '.join(ev['tasks'])} x "
          f"{ev['limit']} items ({eval_tokens} forward tokens, {eval_positions} scored); torch {torch.__version__}, {torch.get_num_threads()} threads")
    for precision in ["fp32"] + (["bf16"] if args.bf16 else []):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            rate, h_rate = forward_rate(loaded), head_rate(loaded)
            got = phases(loaded, spec, sets)
        floor = {"held-out, as batched": real / rate, "held-out, by length": real / rate, "eval": eval_tokens / rate}
        head = {"held-out, as batched": labelled / h_rate, "held-out, by length": labelled / h_rate,
                "eval": eval_positions / h_rate}
        print(f"\n{precision}: forward rate {rate:.0f} tokens/s (decoder, 8 x 256), head {h_rate:.0f} positions/s")
        for phase, s in got["seconds"].items():
            with_head = floor[phase] + head[phase]
            print(f"  {phase:22s} {s:7.1f} s   floor {floor[phase]:6.1f} s   {100 * floor[phase] / s:5.1f} % of floor"
                  f"   with head {with_head:6.1f} s   {100 * with_head / s:5.1f} %")
        before = got["seconds"]["held-out, as batched"] + got["seconds"]["eval"]
        after = got["seconds"]["held-out, by length"] + got["seconds"]["eval"]
        print(f"  a point: {before:.1f} s before, {after:.1f} s after ({before / after:.2f}x); its floor "
              f"{floor['eval'] + floor['held-out, by length']:.1f} s, with the head "
              f"{floor['eval'] + floor['held-out, by length'] + head['eval'] + head['held-out, by length']:.1f} s; target {TARGET_S:.0f} s. Largest per-example "
              f"difference of the held-out mean losses between the two paths: {got['gap']:.1e}")


if __name__ == "__main__":
    main()
