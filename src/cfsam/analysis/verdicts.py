"""The paper's claims on the frontier study, in two views, as values.

A comparison of method b with method a (families of ``frontier``) is read two ways:
- **matched learning** (``fronts.compare``): b's forgetting minus a's where both learned the same amount,
  along their fronts; also under the conservative *step* front, which must not flip the verdict;
- **the same learning rate** (``same_lr``): b at the setting its front uses at that learning level, against
  a at the same lr, point by point along the runs (the same seed, the same fraction of the run), paired over
  the held-out examples and the seeds. No interpolation, and no choice of lr in a's favour.
A claim is *reproduced* or *opposite* only when both views agree; when they disagree it *depends on the view*,
and both numbers are given. A set whose AdamW reference fails the study's sizing rule
(``frontier.learning_check``) gives no verdict: it is *not comparable*, with the reason.
Every row names the entries it was computed from (``results/<preset>/<name>.json.gz``).
"""
from __future__ import annotations

from collections import Counter
from enum import Enum

import numpy as np
import pandas as pd

from cfsam.analysis import claims
from cfsam.analysis.frontier import learning_check
from cfsam.analysis.fronts import Effect, compare, every_seed
from cfsam.analysis.study import Study, measure_arrays, measures


class Verdict(Enum):
    """What our runs say of one of the paper's claims."""
    REPRODUCED = "reproduced"
    OPPOSITE = "opposite"
    INCONCLUSIVE = "inconclusive"
    NOT_COMPARABLE = "not comparable"
    DEPENDS = "depends on the view"

    def __str__(self) -> str:
        return self.value


def outcome(effect: Effect | None, expect: str) -> Verdict:
    """A comparison's effect read against the paper's expectation ("less" or "more" forgetting of b)."""
    if effect in (None, Effect.NO_COMMON):
        return Verdict.NOT_COMPARABLE
    if effect is Effect.INCONCLUSIVE:
        return Verdict.INCONCLUSIVE
    return Verdict.REPRODUCED if effect.value == f"{expect} forgetting" else Verdict.OPPOSITE


def combine(*views: Verdict) -> Verdict:
    """One verdict from several views: theirs when they agree; inconclusive when none is decisive; not
    comparable when one is decisive and another could not be read (a missing view cannot confirm it, nor
    contradict it); else it depends on the view."""
    if len(set(views)) == 1:
        return views[0]
    if set(views) <= {Verdict.INCONCLUSIVE, Verdict.NOT_COMPARABLE}:
        return Verdict.INCONCLUSIVE
    if Verdict.NOT_COMPARABLE in views:
        return Verdict.NOT_COMPARABLE
    return Verdict.DEPENDS


def front_setting(points: pd.DataFrame, dataset: str, family: str, level: float) -> tuple | None:
    """The (setting, lr) a family's front stands on at learning ``level``: per seed, the point of least
    forgetting among those that learned at least ``level`` (the step front's point), the most common across
    seeds (ties: the first seed's); where no point reaches the level, the setting that learned most."""
    sub = points[(points["dataset"] == dataset) & (points["family"] == family)]
    if sub.empty:
        return None
    picks = []
    for _, g in sub.groupby("seed", sort=True):
        ok = g[g["learning"] >= level]
        r = ok.loc[ok["forgetting"].idxmin()] if not ok.empty else g.loc[g["learning"].idxmax()]
        picks.append((r["setting"], r["lr"]))
    return Counter(picks).most_common(1)[0][0]


def same_lr(study: Study | str, dataset: str, a: str, b: str, setting, lr: float, *, level: float = 0.0,
            n_boot: int = 500, seed: int = 0) -> dict:
    """b at ``setting`` and ``lr`` against a at the same lr (a's setting there: its front setting at ``level``;
    AdamW has one), over the points both ran at the same seed and fraction of the run (a Wise-FT merge pairs
    with its run's end): mean Δ forgetting and Δ learning (b - a), each with a 95 % bootstrap interval over the
    held-out examples and the seeds. ``a="none"``: b against the stage-1 model (0, 0)."""
    study = Study.of(study)
    if study.empty:
        return {}
    t = study.table[study.table["dataset"] == dataset]
    tb = t[(t["family"] == b) & (t["setting"] == setting) & (t["lr"] == lr)]
    sa, ta = None, t.iloc[:0]
    if a != "none":
        at_lr = t[(t["family"] == a) & (t["lr"] == lr)]
        pick = front_setting(measures(study.only(at_lr)), dataset, a, level) if not at_lr.empty else None
        if pick is not None:
            sa = pick[0]
            ta = at_lr[at_lr["setting"] == sa]
    def key(r):  # the same seed and share of the run
        return r["seed"], float(r["at"]) / float(r["of"])

    kb = {key(r): r["name"] for _, r in tb.iterrows()}
    ka = {key(r): r["name"] for _, r in ta.iterrows()} if a != "none" else {k: None for k in kb}
    pairs = sorted(set(kb) & set(ka))
    out = {"dataset": dataset, "comparison": f"{b} vs {a}", "lr": lr, "b setting": setting, "a setting": sa,
           "pairs": len(pairs), "seeds": len({p[0] for p in pairs})}
    if not pairs:
        return {**out, "Δ forgetting": np.nan, "low": np.nan, "high": np.nan, "Δ learning": np.nan,
                "learning low": np.nan, "learning high": np.nan, "effect": Effect.NO_COMMON, "entries": ""}
    used = pd.concat([tb[tb["name"].isin([kb[p] for p in pairs])], ta[ta["name"].isin([ka[p] for p in pairs])]])
    sub = study.only(used)
    sizes = sub.draw_sizes(dataset)
    seeds = sorted({p[0] for p in pairs})

    row = {n: i for i, n in enumerate(sub.table["name"])}
    ib, ia = (np.array([row[kb[p]] for p in pairs]), np.array([row[ka[p]] if ka[p] else -1 for p in pairs]))
    pair_seeds = np.array([p[0] for p in pairs])

    def delta(draws, seed_draw):
        learn, forget = measure_arrays(sub, draws)
        # a = "none": b against the stage-1 model, which neither learned nor forgot
        fa, la = (np.where(ia >= 0, forget[ia], 0.0), np.where(ia >= 0, learn[ia], 0.0))
        d = np.stack([forget[ib] - fa, learn[ib] - la], axis=1)
        per_seed = {s: d[pair_seeds == s].mean(axis=0) for s in seeds}
        return np.mean([per_seed[s] for s in seed_draw], axis=0)

    point = delta(None, seeds)
    rng = np.random.default_rng(seed)
    boots = np.array([delta({k: rng.integers(0, n, n) for k, n in sizes.items()},
                            list(rng.choice(seeds, len(seeds), replace=True))) for _ in range(n_boot)])
    (flo, llo), (fhi, lhi) = np.percentile(boots, [2.5, 97.5], axis=0)
    return {**out, "Δ forgetting": point[0], "low": flo, "high": fhi, "Δ learning": point[1],
            "learning low": llo, "learning high": lhi, "effect": Effect.of(flo, fhi),
            "entries": " ".join(used["name"])}


def _missing_view(study: Study, ds: str, a: str, same: dict, m) -> str:
    """Why the same-lr view could not be read, and the command that computes what it lacks."""
    if m["effect"] is Effect.NO_COMMON:
        return "the fronts share no learning level, so there is no setting to read the same-lr view at"
    return (f"the same-lr view has no pairs: {a} has no run at lr {same.get('lr'):g} with the same seeds and "
            f"points (`cfsam run-missing --preset {study.preset} --notebooks frontier`)")


def sized(study: Study | str) -> dict[str, str]:
    """Per stage-2 set whose AdamW reference fails the sizing rule: why (no entry: the set passes)."""
    lc = learning_check(study)
    out = {}
    if lc.empty:
        return out
    for ds, g in lc[lc["stage"].str.startswith("stage 2")].groupby("dataset"):
        if not g["clears the sizing rule"].all():
            worst = g.loc[g["learning"].idxmin()]
            out[ds] = (f"its AdamW reference learned {worst['learning']:.3f} ± {worst['se']:.3f} nats, under the "
                       "sizing rule (at least 0.1 nats and four standard errors)")
    return out


def tuned_unlike(points: pd.DataFrame, a: str, b: str, n_seeds: int) -> str:
    """Why a matched-learning view is not yet a fair one: the learning rates that the two families' fronts are
    built from (``points``: the settings every seed ran) differ, so one front had more chances to be tuned. ""
    when they span the same lrs."""
    lrs = {fam: sorted(set(points[points["family"] == fam]["lr"])) for fam in (a, b)}
    if lrs[a] == lrs[b]:
        return ""
    def grid(fam: str) -> str:
        return ", ".join(f"{x:g}" for x in lrs[fam]) or "none"
    return (f"tuned unlike over its {n_seeds} seeds: {a}'s front spans lr {grid(a)}, {b}'s lr {grid(b)}, so the "
            "matched-learning view waits for the same grid (`cfsam status` lists the runs)")


def claim_verdicts(study: Study | str, *, level: float = 0.5, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """Every claim of ``claims.yaml`` with a ``frontier`` comparison, on every stage-2 set with frontier points
    that the paper makes it on: the matched-learning view at ``level`` of the common reach (and under the step
    front), the same-lr view at the lr of b's front setting there, and the verdict of both."""
    study = Study.of(study)
    if study.empty:
        return pd.DataFrame()
    pts, unsized, rows, planned = measures(study), sized(study), [], study.planned
    for claim in claims.registry():
        f = claim.get("frontier")
        if not f:
            continue
        for ds in claims.claim_sets(claim, study.sets):
            m = compare(study, ds, f["a"], f["b"], levels=(level,), n_boot=n_boot, seed=seed)
            if m.empty:  # the preset plans both families here, but their runs are not computed yet: say so
                if {f["b"], f["a"]} - {"none"} <= planned.get(ds, set()):
                    rows.append({"claim": claim["id"], "paper": claim["claim"], "dataset": ds,
                                 "comparison": f"{f['b']} vs {f['a']}", "verdict": Verdict.NOT_COMPARABLE,
                                 "reason": f"its runs are not computed yet (`cfsam run-missing --preset {study.preset} "
                                           "--notebooks frontier`)", "learning level": np.nan, "seeds": 0,
                                 "same-lr Δ": np.nan, "entries": ""})
                continue
            m = m.iloc[0]
            st = compare(study, ds, f["a"], f["b"], levels=(level,), n_boot=n_boot, seed=seed,
                         front="step").iloc[0]
            v_match, v_step = outcome(m["effect"], f["expect"]), outcome(st["effect"], f["expect"])
            same, unlike = {}, ""
            if m["effect"] is not Effect.NO_COMMON:  # b's front setting among those every seed ran, as the fronts
                both = pts[pts["family"].isin([f["a"], f["b"]]) & (pts["dataset"] == ds)]
                seeds = set(both[both["family"] == f["b"]]["seed"])
                if f["a"] != "none":
                    seeds &= set(both[both["family"] == f["a"]]["seed"])
                alike = every_seed(both, seeds)
                if f["a"] != "none":
                    unlike = tuned_unlike(alike, f["a"], f["b"], len(seeds))
                setting, lr = front_setting(alike, ds, f["b"], m["learning level"])
                same = same_lr(study, ds, f["a"], f["b"], setting, lr, level=m["learning level"],
                               n_boot=n_boot, seed=seed)
            v_same = outcome(same.get("effect"), f["expect"])
            verdict, reason = combine(v_match, v_same), ""
            if ds in unsized:
                verdict, reason = Verdict.NOT_COMPARABLE, unsized[ds]
            else:
                reason = "; ".join(x for x in (
                    f"the step front gives {v_step}" if v_step is not v_match else "",
                    _missing_view(study, ds, f["a"], same, m) if v_same is Verdict.NOT_COMPARABLE else "",
                    unlike) if x)
            if f.get("note"):
                reason = "; ".join(x for x in (reason, f["note"]) if x)
            rows.append({
                "claim": claim["id"], "paper": claim["claim"], "dataset": ds,
                "comparison": f"{f['b']} vs {f['a'] if f['a'] != 'none' else 'the stage-1 model'}",
                "verdict": verdict, "reason": reason,
                "learning level": m["learning level"], "Δ forgetting": m["Δ forgetting"], "low": m["low"],
                "high": m["high"], "matched learning": v_match,
                "step Δ": st["Δ forgetting"], "step low": st["low"], "step high": st["high"], "step front": v_step,
                "lr": same.get("lr"), "b setting": same.get("b setting"), "same-lr Δ": same.get("Δ forgetting"),
                "same-lr low": same.get("low"), "same-lr high": same.get("high"),
                "same-lr Δ learning": same.get("Δ learning"), "same lr": v_same, "seeds": m["seeds"],
                "entries": " ".join(dict.fromkeys(m["entries"].split() + same.get("entries", "").split())),
            })
    return pd.DataFrame(rows)


FAMILIES = ("sam", "asam", "rehearsal", "wise_ft", "sam_rehearsal", "sam_wise_ft")


def same_lr_table(study: Study | str, a: str = "adamw", families=FAMILIES, *, n_boot: int = 300,
                  seed: int = 0) -> pd.DataFrame:
    """The same-lr view of every family against AdamW: each setting at each lr where both ran, on every set."""
    study = Study.of(study)
    if study.empty:
        return pd.DataFrame()
    table, rows = study.table, []
    for ds in study.sets:
        t = table[table["dataset"] == ds]
        lrs = set(t[t["family"] == a]["lr"])
        for fam in families:
            for (setting, lr), _ in t[(t["family"] == fam) & t["lr"].isin(lrs)].groupby(["setting", "lr"]):
                rows.append(same_lr(study, ds, a, fam, setting, lr, n_boot=n_boot, seed=seed))
    return pd.DataFrame(rows)


def levels(claim_verdicts: pd.DataFrame, claim: str = "sam-mitigates") -> dict[str, float]:
    """Per set, the learning level at which ``claim`` is read (for the frontier figure)."""
    if claim_verdicts.empty:
        return {}
    rows = claim_verdicts[claim_verdicts["claim"] == claim]
    return dict(zip(rows["dataset"], rows["learning level"]))
