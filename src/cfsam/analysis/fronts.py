"""Learning-forgetting frontiers, and two methods compared along them at matched learning.

A method's frontier, for one training seed, is the Pareto front of its points (``study.measures``; the
stage-1 model, at (0, 0), included): the least forgetting reached with at least that much learning,
interpolated linearly between front points (or, conservatively, as a step). Two methods are compared at
matched learning levels L: Δ(L) = F_b(L) - F_a(L), averaged over seeds, with a bootstrap that resamples the
held-out examples (the same draw for every run: they are the same examples) and the training seeds (paired:
a seed is the same stage-1 model and data order for both methods).
"""
from __future__ import annotations

from enum import Enum

import numpy as np
import pandas as pd

from cfsam.analysis.study import FORGETTING, Study, measure_arrays
from cfsam.core.errors import UsageError


class Effect(Enum):
    """What a comparison found of b's forgetting against a's (from its 95 % interval)."""
    LESS = "less forgetting"
    MORE = "more forgetting"
    INCONCLUSIVE = "inconclusive"
    NO_COMMON = "no common learning"

    @classmethod
    def of(cls, low: float, high: float) -> "Effect":
        return cls.LESS if high < 0 else cls.MORE if low > 0 else cls.INCONCLUSIVE

    def __str__(self) -> str:
        return self.value


def pareto_curve(learning: np.ndarray, forgetting: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto front (most learning, least forgetting) of the points and the origin, sorted by learning:
    a point is on it when no other point learns at least as much and forgets less (ties in forgetting stay:
    a run that never forgets keeps the stage-1 model's (0, 0) on its front)."""
    x = np.append(np.asarray(learning, float), 0.0)
    y = np.append(np.asarray(forgetting, float), 0.0)
    order = np.lexsort((y, -x))  # most learning first, ties: least forgetting first
    front, best = [], np.inf
    for i in order:
        if y[i] <= best:
            front.append(i)
            best = y[i]
    front = np.array(front[::-1])
    return x[front], y[front]


FRONTS = {"linear": "linear between front points",
          "step": "the least forgetting among the points that learned at least that much (conservative)"}


def forgetting_at(curve: tuple[np.ndarray, np.ndarray], level: float, front: str = "linear") -> float:
    """The frontier's forgetting at learning ``level``, linear between front points (``front="linear"``) or
    the least forgetting of a point that learned at least ``level`` (``"step"``: no credit for points it never
    reached); NaN beyond its reach. Below its least learning (a front whose every point forgets less than the
    stage-1 model's 0) it is the least forgetting reached with at least that much learning: the first point's."""
    x, y = curve
    if level > x.max() or level < min(x.min(), 0.0):
        return float("nan")
    if front == "step":
        return float(y[x >= level].min())
    return float(np.interp(level, x, y))  # np.interp holds the first value below x[0]


def curves(points: pd.DataFrame) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Every (dataset, family, seed)'s Pareto front, for plotting."""
    return {(ds, fam, seed): pareto_curve(g["learning"].to_numpy(), g["forgetting"].to_numpy())
            for (ds, fam, seed), g in points.groupby(["dataset", "family", "seed"])}


def seed_curves(points: pd.DataFrame, family: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """One family's Pareto front per seed."""
    sub = points[points["family"] == family]
    return {seed: pareto_curve(g["learning"].to_numpy(), g["forgetting"].to_numpy()) for seed, g in sub.groupby("seed")}


_NOTHING = (np.array([0.0, np.inf]), np.array([0.0, 0.0]))  # family "none": the stage-1 model forgets nothing


SETTINGS = {"every seed": "only the settings every seed ran",
            "all": "every setting a seed ran"}  # the first seed also runs the sweep's extra points: a sensitivity


def every_seed(table: pd.DataFrame, seeds) -> pd.DataFrame:
    """The rows of the settings (family, setting and lr) that every one of ``seeds`` ran, and of those only the
    points along the run (``at``) that every one of them has: a seed whose run is measured only in part must
    not give its family's other seeds a front of more points than its own."""
    keys = ["family", "setting", "lr"] + (["at"] if "at" in table else [])
    ran = table.groupby(keys)["seed"].agg(set)
    keep = {k for k, v in ran.items() if set(seeds) <= v}
    return table[[k in keep for k in zip(*(table[k] for k in keys))]]


def compare(study: Study | str, dataset: str, a: str = "adamw", b: str = "sam", *, levels=(0.25, 0.5, 0.75),
            n_boot: int = 1000, seed: int = 0, forgetting: str = "heldout", settings: str = "every seed",
            front: str = "linear") -> pd.DataFrame:
    """Δ forgetting (b - a) at matched learning: one row per level, given as a fraction of the learning both
    methods reach on every seed; the point estimate, a 95 % bootstrap interval (held-out examples, eval
    items and seeds resampled) and the verdict. ``forgetting``: one of ``FORGETTING``; ``settings``: one of
    ``SETTINGS``, which points build each seed's front (with "every seed", every seed's front is built from the
    same sweep); ``front``: one of ``FRONTS``; ``a="none"`` compares b with the stage-1 model (no forgetting at
    any learning)."""
    if front not in FRONTS:
        raise UsageError(f"unknown front {front!r}; allowed: {', '.join(FRONTS)}")
    if forgetting not in FORGETTING:
        raise UsageError(f"unknown forgetting measure {forgetting!r}; allowed: {', '.join(FORGETTING)}")
    if settings not in SETTINGS:
        raise UsageError(f"unknown settings {settings!r}; allowed: {', '.join(SETTINGS)}")
    study = Study.of(study)
    if study.empty:
        return pd.DataFrame()
    table = study.table
    table = table[(table["dataset"] == dataset) & table["family"].isin([a, b])]
    seeds = sorted(set(table[table["family"] == b]["seed"]) &
                   (set(table[table["family"] == a]["seed"]) if a != "none" else set(table["seed"])))
    if not seeds:
        return pd.DataFrame()
    table = table[table["seed"].isin(seeds)]
    if settings == "every seed":
        table = every_seed(table, seeds)
    study = study.only(table)
    sizes = study.draw_sizes(dataset, forgetting)

    fam, sd = table["family"].to_numpy(), table["seed"].to_numpy()
    rows_of = {(f, s): np.flatnonzero((fam == f) & (sd == s)) for f in (a, b) for s in seeds}

    def curves_of(learn, forget, f):  # ``seed_curves`` on arrays: the bootstrap builds them on every draw
        return {s: pareto_curve(learn[rows_of[f, s]], forget[rows_of[f, s]]) for s in seeds}

    def delta(draws, seed_draw):
        learn, forget = measure_arrays(study, draws, forgetting)
        ca = curves_of(learn, forget, a) if a != "none" else {s: _NOTHING for s in seeds}
        cb = curves_of(learn, forget, b)
        reach = min(min(ca[s][0].max(), cb[s][0].max()) for s in seeds)
        if not reach > 0:  # in this draw one of them learns nothing: nothing to compare at
            return np.full(len(levels), np.nan), reach
        out = []
        for frac in levels:
            level = frac * reach
            out.append(np.mean([forgetting_at(cb[s], level, front) - forgetting_at(ca[s], level, front)
                                for s in seed_draw]))
        return np.array(out), reach

    point, reach = delta(None, seeds)
    if not reach > 0:  # one of them never learned its set: there is no matched learning to compare at
        return pd.DataFrame([{"dataset": dataset, "comparison": f"{b} vs {a}", "learning level": np.nan,
                              "share of common reach": np.nan, "Δ forgetting": np.nan, "low": np.nan, "high": np.nan,
                              "verdict": f"no common learning: the most both learn on every seed is {reach:.3f} nats",
                              "effect": Effect.NO_COMMON, "seeds": len(seeds), "resampled": "",
                              "forgetting measure": forgetting, "frontier from": SETTINGS[settings], "front": front,
                              "entries": " ".join(table["name"])}])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        draws = {s: rng.integers(0, n, n) for s, n in sizes.items()}
        seed_draw = list(rng.choice(seeds, len(seeds), replace=True))
        boots.append(delta(draws, seed_draw)[0])
    boots = np.array(boots)
    ok = np.isfinite(boots).all(axis=1)  # a draw in which the fronts share no learning, or miss a level, gives none
    lo, hi = np.percentile(boots[ok], [2.5, 97.5], axis=0) if ok.any() else (np.full(len(levels), np.nan),) * 2
    rows = []
    for i, frac in enumerate(levels):
        effect = Effect.of(lo[i], hi[i])
        verdict = effect.value
        if ok.mean() < 0.95:  # the comparison itself is not stable under resampling: no verdict
            effect, verdict = Effect.INCONCLUSIVE, f"inconclusive: comparable in only {ok.mean():.0%} of the bootstrap draws"
        rows.append({"dataset": dataset, "comparison": f"{b} vs {a}", "learning level": frac * reach,
                     "share of common reach": frac, "Δ forgetting": point[i], "low": lo[i], "high": hi[i],
                     "verdict": f"{b}: {verdict}", "effect": effect, "seeds": len(seeds), "comparable draws": ok.mean(),
                     "resampled": ", ".join(f"{n} ({k[1] if isinstance(k, tuple) else k})" for k, n in sizes.items()),
                     "forgetting measure": forgetting, "frontier from": SETTINGS[settings], "front": front,
                     "entries": " ".join(table["name"])})
    return pd.DataFrame(rows)


FAMILIES = ("sam", "asam", "rehearsal", "wise_ft")  # each compared with AdamW at matched learning


def compare_all(study: Study | str, a: str = "adamw", families=FAMILIES, *, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """``compare`` of every family in ``families`` with ``a``, on every stage-2 set with frontier points: Δ
    forgetting at a quarter, half and three quarters of the common reach (rows of families without points
    are left out)."""
    study = Study.of(study)
    rows = [compare(study, ds, a, b, n_boot=n_boot, seed=seed) for ds in study.sets for b in families]
    rows = [t for t in rows if not t.empty]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def robustness(study: Study | str, dataset: str | None = None, a: str = "adamw", b: str = "sam", *, level: float = 0.5,
               n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """The verdict of ``compare`` at one matched-learning level under every definition of forgetting in
    ``FORGETTING`` (each seed's front built from the settings every seed ran), once with the first seed's extra
    settings too (``SETTINGS``: "all") and once under the conservative step front (``FRONTS``);
    whether each agrees with the default's (a verdict must not flip with the definition). ``dataset=None``:
    every stage-2 set with frontier points, one after the other."""
    study = Study.of(study)
    out = []
    for ds in [dataset] if dataset else study.sets:
        rows = []
        variants = [(m, "every seed", "linear") for m in FORGETTING] + [("heldout", "all", "linear"),
                                                                         ("heldout", "every seed", "step")]
        for measure, settings, front in variants:
            try:
                t = compare(study, ds, a, b, levels=(level,), n_boot=n_boot, seed=seed, forgetting=measure,
                            settings=settings, front=front)
            except ValueError as err:  # e.g. no eval items shared: say so in the table
                t = pd.DataFrame([{"dataset": ds, "comparison": f"{b} vs {a}", "verdict": f"not computable: {err}",
                                   "effect": None, "forgetting measure": measure, "frontier from": SETTINGS[settings],
                                   "front": front}])
            rows.append(t)
        t = pd.concat(rows, ignore_index=True)
        if not t.empty:
            out.append(t.assign(**{"same verdict as the default": t["effect"] == t["effect"].iloc[0]}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()
