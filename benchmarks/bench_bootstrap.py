"""What a bootstrap draw of the frontier's verdicts costs: ``study.measure_arrays`` (a draw as example weights,
one matrix product for all points) against the per-point indexing it replaced (``study.loss_mean`` on the drawn
indices, one point at a time), on the same draws of the same committed entries, with their largest difference.

    .venv/bin/python benchmarks/bench_bootstrap.py [--preset cpu] [--dataset metamathqa] [--draws 200]

Every verdict of the book resamples the held-out examples hundreds of times per comparison (``fronts.compare``,
``verdicts.same_lr``), so this is most of what the frontier and first chapters cost to build. It reads only
``results/<preset>``: no data mirror and no model.
"""
from __future__ import annotations

import argparse

import numpy as np

from timing import Clock

from cfsam.analysis.study import Study, loss_mean, measure_arrays, per_example


def indexed(study: Study, draws: dict) -> tuple[np.ndarray, np.ndarray]:
    """The held-out learning and forgetting of every point, one point and one fancy index at a time."""
    start, s1 = study.entries["start"], study.stage1_set
    learn, forget = [], []
    for name, own in zip(study.table["name"], study.table["dataset"]):
        e = study.entries[name]
        learn.append(loss_mean(per_example(start, own), draws[own]) - loss_mean(per_example(e, own), draws[own]))
        forget.append(loss_mean(per_example(e, s1), draws[s1]) - loss_mean(per_example(start, s1), draws[s1]))
    return np.array(learn), np.array(forget)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--dataset", default="metamathqa")
    ap.add_argument("--draws", type=int, default=200)
    args = ap.parse_args()
    full = Study.of(args.preset)
    if full.empty:
        raise SystemExit(f"preset {args.preset!r} has no frontier points in results/{args.preset}")
    if args.dataset not in full.sets:
        raise SystemExit(f"--dataset {args.dataset!r} has no frontier points; allowed: {', '.join(full.sets)}")
    study = full.only(full.table[full.table["dataset"] == args.dataset])
    sizes = study.draw_sizes(args.dataset)
    rng = np.random.default_rng(0)
    draws = [{k: rng.integers(0, n, n) for k, n in sizes.items()} for _ in range(args.draws)]
    with Clock() as old:
        a = [indexed(study, d) for d in draws]
    with Clock() as new:
        b = [measure_arrays(study, d) for d in draws]
    diff = max(float(np.abs(np.subtract(x, y)).max()) for p, q in zip(a, b) for x, y in zip(p, q))
    print(f"{args.preset}/{args.dataset}: {len(study.table)} points, {args.draws} draws of "
          + ", ".join(f"{n} ({k})" for k, n in sizes.items()))
    print(f"  per-point indexing  {old.wall:7.3f} s")
    print(f"  weights, one matmul {new.wall:7.3f} s   ({old.wall / new.wall:.1f}x faster)")
    print(f"  largest difference  {diff:.1e} nats (summation order only)")


if __name__ == "__main__":
    main()
