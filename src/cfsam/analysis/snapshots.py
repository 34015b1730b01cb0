"""Snapshots against short runs: is a point along a run where a run of that length would end?

A frontier point at 2/4 is the model halfway through a cosine schedule, not a run of half the steps that
decayed its own learning rate to the end. The preset's ``frontier.short.runs`` train such runs (half the
steps, their own full schedule; ``specs.frontier``). Each is set beside the 2/4 snapshot of its full run and
beside its method's front (the same seed's points): the differences in learning and forgetting, and how far
above that front it forgets, each with a 95 % bootstrap interval over the held-out examples (paired: the same
examples for every model).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cfsam.analysis.fronts import forgetting_at, seed_curves
from cfsam.analysis.study import Study, arrays, measures, point_row
from cfsam.pipeline import specs
from cfsam.pipeline.cache import load_results
from cfsam.pipeline.presets import load_preset


def short_runs(study: Study | str, *, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """One row per computed short run: its learning and forgetting, the differences from the snapshot at the
    same share of its full run (short - snapshot), its forgetting above its method's front at its own
    learning, the intervals, and whether it lies on that front (the interval of the distance holds 0)."""
    preset = study.preset if isinstance(study, Study) else study
    exps = specs.expand(preset)
    short = [n for n, e in exps.items() if e.get("group") == "short"]
    if not short:
        return pd.DataFrame()
    study = Study.of(study)
    if study.empty:
        return pd.DataFrame()
    entries, table = study.entries, study.table
    of = load_preset(preset)["frontier"]["snapshots"]
    rows, rng = [], np.random.default_rng(seed)
    for n, e in load_results(preset, short).items():
        me = point_row(n, exps[n]["run"])
        snap = f"{n.rsplit('-half-s', 1)[0]}-s{me['seed']}-{of // 2}of{of}"
        if e["status"] != "ok" or snap not in entries:
            continue
        fam = table[(table["dataset"] == me["dataset"]) & (table["family"] == me["family"]) &
                    (table["seed"] == me["seed"])]
        sub = study.only(pd.concat([pd.DataFrame([me]), fam], ignore_index=True), extra={n: arrays(e)})
        sizes = sub.draw_sizes(me["dataset"])

        def stats(draws):
            m = measures(sub, draws).set_index("name")
            curve = seed_curves(m.drop(index=n).reset_index(), me["family"])[me["seed"]]
            l, f = m.loc[n, "learning"], m.loc[n, "forgetting"]
            return np.array([l - m.loc[snap, "learning"], f - m.loc[snap, "forgetting"],
                             f - forgetting_at(curve, l), l, f])

        point = stats(None)
        boots = np.array([stats({k: rng.integers(0, s, s) for k, s in sizes.items()}) for _ in range(n_boot)])
        ok = np.isfinite(boots[:, 2])  # a draw in which the short run learns beyond its front's reach: none
        lo, hi = np.nanpercentile(boots, 2.5, axis=0), np.nanpercentile(boots, 97.5, axis=0)
        rows.append({"short run": n, "snapshot": snap, "dataset": me["dataset"], "family": me["family"],
                     "setting": me["setting"], "lr": me["lr"], "seed": me["seed"],
                     "learning": point[3], "forgetting": point[4],
                     "Δ learning": point[0], "Δ learning low": lo[0], "Δ learning high": hi[0],
                     "Δ forgetting": point[1], "Δ forgetting low": lo[1], "Δ forgetting high": hi[1],
                     "above its front": point[2], "above low": lo[2], "above high": hi[2],
                     "on the same front": bool(lo[2] <= 0 <= hi[2]), "comparable draws": ok.mean()})
    return pd.DataFrame(rows)

