"""Flatness against forgetting: one vocabulary of flatness measures and one statistic, for every chapter that
correlates them (the paper tables' runs, whose forgetting is against the base model, and the frontier's end
points, against their stage-1 model).

Every measure is larger for a sharper model (book/methods.md), so Spearman's rho > 0 ranks "sharper forgets
more", the paper's way. Over independent runs only: rho, its permutation p-value (``stats.permutation_spearman``:
exact where it can be) and a percentile bootstrap 95 % interval over the runs. An estimate flagged unconverged
(``cfsam.measurement.curvature.CONVERGED_TOL``) is left out of its measure only.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cfsam.analysis.stats import permutation_spearman
from cfsam.pipeline.schema import Entry

FLATNESS = {"SC": ("flatness", "SC"), "AG": ("flatness", "AG"), "MAG": ("flatness", "MAG"),
            "Hessian top eigenvalue": ("curvature", "hessian_top_eigenvalue"),
            "Hessian trace": ("curvature", "hessian_trace"), "SAM sharpness": ("curvature", "sam_sharpness")}


def value(entry: Entry, measure: str) -> float:
    """An entry's value of a ``FLATNESS`` measure (a surface measure's mean over direction seeds); NaN where it
    has none or its estimate is flagged unconverged."""
    part, key = FLATNESS[measure]
    rec = (entry.get("landscape") or {}).get(part) or {}
    v = rec.get(key)
    v = v.get("mean") if isinstance(v, dict) else v
    return np.nan if v is None or rec.get(f"{key}_converged") is False else float(v)


def correlations(entries: dict[str, Entry], forgetting: pd.Series, *, n_boot: int = 2000,
                 seed: int = 0, groups: pd.Series | None = None) -> pd.DataFrame:
    """Per flatness measure with at least three runs: how many, Spearman's rho against ``forgetting`` (by entry
    name), its permutation p-value, a bootstrap interval over the runs, which way it ranks, and the entries.

    With ``groups`` (by entry name: a model, say), runs are ranked within their group first and permuted and
    resampled within it (``stats.stratified_spearman``), so a group's level (a sharper model that forgets more)
    cannot make the correlation."""
    from scipy.stats import spearmanr

    from cfsam.analysis.stats import stratified_spearman, within_r

    rng, rows = np.random.default_rng(seed), []
    for measure in FLATNESS:
        vals = pd.Series({n: value(e, measure) for n, e in entries.items()}, dtype=float)
        ok = vals.notna() & forgetting.reindex(vals.index).notna()
        if ok.sum() < 3:
            continue
        x, y = vals[ok].to_numpy(), forgetting.reindex(vals.index)[ok].to_numpy(float)
        g = None if groups is None else groups.reindex(vals.index)[ok].to_numpy()
        rho, p, how = permutation_spearman(x, y) if g is None else stratified_spearman(x, y, g, seed=seed)
        boots = []
        for _ in range(n_boot if len(x) > 3 else 0):  # of 3 runs, a draw with 3 distinct ones is the sample itself
            if g is None:
                i = rng.integers(0, len(x), len(x))
            else:  # each group resampled within itself
                i = np.concatenate([rng.choice(np.flatnonzero(g == k), (g == k).sum()) for k in np.unique(g)])
            if len(set(i)) > 2:
                boots.append(spearmanr(x[i], y[i]).statistic if g is None else within_r(x[i], y[i], g[i]))
        lo, hi = np.nanpercentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan)
        ranks = "sharper forgets more" if rho > 0 else "flatter forgets more"
        rows.append({"measure": measure, "runs": int(ok.sum()), "Spearman rho": rho, "low": lo, "high": hi, "p": p,
                     "p from": how, "ranks": ranks, "the paper's way": ranks == "sharper forgets more",
                     "entries": " ".join(vals.index[ok])})
    return pd.DataFrame(rows).set_index("measure") if rows else pd.DataFrame()

