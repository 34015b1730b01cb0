"""Does training in bf16 change the numbers? One frontier run trained twice (``frontier.precision_check``).

The run is trained once in the preset's precision (its end point, ``<set>-<run>-s<seed>-<n>of<n>``) and once in
another (``<set>-<run>-<precision>-s<seed>``), from the same stage-1 model, with the same data order and
measured alike (the measurement itself always in fp32). Each measure is paired over the same held-out
examples or eval items, with a 95 % bootstrap interval; beside it, the same measure's difference between two
training seeds of the same setting, the noise a verdict already lives with. A precision changes results
where its Δ is beyond its interval's zero and comparable to the seeds' difference.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cfsam.analysis.study import arrays, loss_mean, per_example
from cfsam.pipeline import specs
from cfsam.pipeline.cache import load_results
from cfsam.pipeline.presets import load_preset


def pairs(preset: str) -> list[dict]:
    """Each planned check: the set, the run, the other precision and the three entry names compared."""
    p = load_preset(preset)
    f = p.get("frontier")
    if not f:
        return []
    pc, n, (s0, *rest) = f["precision_check"], f["snapshots"], f["seeds"]
    exps = specs.expand(preset)
    out = []
    for ds in f["datasets"][:f["full"]]:
        for run in pc["runs"]:
            other = f"{ds}-{run}-{pc['precision']}-s{s0}"
            seed2 = next((f"{ds}-{run}-s{s}-{n}of{n}" for s in rest if f"{ds}-{run}-s{s}-{n}of{n}" in exps), None)
            if other in exps:
                out.append({"dataset": ds, "run": run, "precision": pc["precision"], "other": other,
                            "reference": f"{ds}-{run}-s{s0}-{n}of{n}", "second seed": seed2})
    return out


def _paired(a: np.ndarray, b: np.ndarray, stat, rng, n_boot: int) -> tuple[float, float, float]:
    """stat(b) - stat(a) over the same rows, with a percentile 95 % bootstrap interval."""
    idx = np.arange(len(a))
    boots = [stat(b, d) - stat(a, d) for d in (rng.integers(0, len(a), len(a)) for _ in range(n_boot))]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return stat(b, idx) - stat(a, idx), float(lo), float(hi)


def check(preset: str, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per check and measure (each held-out set's loss, each eval task's primary metric): the reference run's
    value, the other precision's, their Δ with its interval, and the second seed's Δ from the reference."""
    rows, rng = [], np.random.default_rng(seed)
    for c in pairs(preset):
        names = [c["reference"], c["other"]] + ([c["second seed"]] if c["second seed"] else [])
        got = {n: e for n, e in load_results(preset, names).items() if e["status"] == "ok"}
        if c["reference"] not in got or c["other"] not in got:
            continue
        ref, oth, sd = got[c["reference"]], got[c["other"]], got.get(c["second seed"])
        cpus = [((e.get("provenance") or {}).get("machine") or {}).get("cpu", "?") for e in (ref, oth)]
        base = {"dataset": c["dataset"], "run": c["run"], "precision": c["precision"], "machines": " / ".join(cpus)}
        for s in ref["heldout_loss"]:
            a, b = per_example(ref, s), per_example(oth, s)
            d, lo, hi = _paired(a, b, loss_mean, rng, n_boot)
            seed_d = loss_mean(per_example(sd, s), np.arange(len(a))) - loss_mean(a, np.arange(len(a))) if sd else np.nan
            rows.append({**base, "measure": f"held-out loss: {s}", "reference": loss_mean(a, np.arange(len(a))),
                         "other": loss_mean(b, np.arange(len(b))), "Δ": d, "low": lo, "high": hi,
                         "second seed's Δ": seed_d, "entries": " ".join(names)})
        ev_a, ev_b, ev_s = arrays(ref)["eval_items"], arrays(oth)["eval_items"], arrays(sd)["eval_items"] if sd else {}
        mean = lambda v, d: float(np.mean(v[d]))  # noqa: E731
        for task in ev_a:
            if task not in ev_b or not np.array_equal(ev_a[task]["idx"], ev_b[task]["idx"]):
                continue
            a, b = ev_a[task]["accuracy"], ev_b[task]["accuracy"]
            d, lo, hi = _paired(a, b, mean, rng, n_boot)
            seed_d = float(np.mean(ev_s[task]["accuracy"]) - np.mean(a)) if task in ev_s else np.nan
            rows.append({**base, "measure": f"eval: {task}", "reference": float(np.mean(a)),
                         "other": float(np.mean(b)), "Δ": d, "low": lo, "high": hi, "second seed's Δ": seed_d,
                         "entries": " ".join(names)})
    return pd.DataFrame(rows)


def sentence(t: pd.DataFrame, preset: str) -> str:
    """What the check shows: how far the other precision moved each measure, against the seeds' difference."""
    if t.empty:
        planned = pairs(preset)
        if not planned:
            return f"The {preset} preset plans no precision check."
        return (f"The precision check is not computed yet: `cfsam run-missing --preset {preset} --only "
                + ",".join(c["other"] for c in planned) + "`.")
    said = []
    for (ds, run, prec), g in t.groupby(["dataset", "run", "precision"], sort=False):
        moved = g[(g["low"] > 0) | (g["high"] < 0)]
        big = (g["Δ"].abs() > g["second seed's Δ"].abs()).sum()
        held = g[g["measure"].str.startswith("held-out")]
        said.append(f"{run} on {ds} trained in {prec}: held-out losses moved by "
                    + ", ".join(f"{r['Δ']:+.4f} [{r.low:+.4f}, {r.high:+.4f}] ({r.measure.split(': ')[1]})"
                                for _, r in held.iterrows())
                    + f"; {len(moved)} of {len(g)} measures moved beyond their interval's zero, and {big} by more "
                      "than a second training seed moves them")
        ref_cpu, other_cpu = g["machines"].iloc[0].split(" / ")
        if ref_cpu != other_cpu:  # fp32 kernels differ between CPUs too: the Δ holds both effects
            said[-1] += (f" (the {prec} run was trained on another CPU, {other_cpu}, than the reference, {ref_cpu}: "
                         "its Δ holds the machines' own floating-point differences too, so it bounds bf16's effect)")
    return "; ".join(said) + "."
