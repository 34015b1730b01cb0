"""What the frontier study's points show beside the fronts: the points themselves, where each run ends,
whether each stage learns what it is said to, the runs that never learned, SAM's gradients, the paper's own
comparison, and flatness against forgetting. Every function takes a ``study.Study`` (or the preset to load
one from); the definitions of learning and forgetting are ``study``'s.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cfsam.analysis import flatness
from cfsam.analysis.study import EVAL_KEYS, START, Study, loss_mean, measure_arrays, measures, per_example, stage1_set
from cfsam.pipeline import specs
from cfsam.pipeline.cache import load_results
from cfsam.pipeline.presets import load_preset


def paper_comparison(preset: str, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The paper's own comparison beside the frontier: AdamW for the stage-2 epochs, SAM for half of them (the
    same number of passes) and AdamW for as few, on every stage-2 set, with what each learned and forgot
    against the same stage-1 model on the same held-out examples as the frontier points, each with a 95 %
    interval from resampling those examples (paired: one draw for both models). Only those computed
    (``cfsam run-missing --notebooks tab2a`` computes them)."""
    from cfsam.analysis import claims, report

    exps = specs.expand(preset)
    own = [f"s2-{ds}-{m}" for ds in load_preset(preset)["stage2_datasets"] for m in ("adamw", "sam", "adamw-e1")]
    own = [n for n in own if n in exps]
    if "stage1" not in exps or not own:
        return pd.DataFrame()
    lf = report.learning_and_forgetting(preset, ["stage1", *own])
    if lf.empty:
        return lf
    lf = lf[lf["status"] == "ok"].drop(columns=["status", "adaptive"])
    lf = lf.rename(columns={"learned (Δ own held-out loss)": "learning",
                            "forgot (Δ Alpaca held-out loss)": "forgetting"}).assign(learning=lambda d: -d["learning"])
    entries = load_results(preset, ["stage1", *lf.index])
    start, rng, draws = entries["stage1"], np.random.default_rng(seed), {}
    for col, sign in (("learning", -1), ("forgetting", 1)):  # learning is a fall of the loss
        bounds = []
        for name in lf.index:
            ds = specs.describe(exps[name]["run"])["stage2"] if col == "learning" else stage1_set(start)
            bd = claims.heldout_pair(start, entries[name], ds, draws, rng, n_boot)
            bounds.append(sorted(sign * np.percentile(bd, [2.5, 97.5])) if bd is not None else [np.nan, np.nan])
        at = lf.columns.get_loc(col) + 1
        lf.insert(at, f"{col} low", [b[0] for b in bounds])
        lf.insert(at + 1, f"{col} high", [b[1] for b in bounds])
    return lf


def points(study: Study | str) -> pd.DataFrame:
    """Every frontier point with its learning and forgetting (all held-out examples), for tables and plots."""
    study = Study.of(study)
    if study.empty:
        return study.table
    out = measures(study)
    if study.suite():  # learning beside every forgetting measure: the fall of general ability too
        for m in EVAL_KEYS:
            out[f"ability fall ({m})"] = measures(study, forgetting=m)["forgetting"]
    return out


def _bootstrap_se(fn, sizes: dict, n_boot: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return float(np.std([fn({k: rng.integers(0, n, n) for k, n in sizes.items()}) for _ in range(n_boot)], ddof=1))


def learning_check(study: Study | str, *, n_boot: int = 500, seed: int = 0, min_nats: float = 0.1,
                   min_se: float = 4.0) -> pd.DataFrame:
    """Does each stage learn what it is said to? Stage 1 (base model -> ``frontier-stage1`` on its own
    held-out set, when the base model is measured) and every AdamW run of the preset's stage-2 learning rate
    at its end point: the fall of its own held-out loss, a bootstrap standard error over the held-out
    examples, and whether it clears ``min_nats`` and ``min_se`` standard errors (the study's sizing rule)."""
    study = Study.of(study)
    if study.empty:
        return pd.DataFrame()
    preset, table, start, rows = study.preset, study.table, study.start, []
    s1 = study.stage1_set
    base = load_results(preset, ["base"]).get("base", {}) if "base" in specs.expand(preset) else {}
    if base.get("status") == "ok" and "per_example" in (base.get("heldout_loss") or {}).get(s1, {}):
        pe_b, pe_s = np.asarray(base["heldout_loss"][s1]["per_example"], float), per_example(start, s1)
        if len(pe_b) == len(pe_s):  # the same held-out examples (an entry without per-example losses: no row)
            def fall(d, ix=None):
                ix = d[s1] if d else np.arange(len(pe_b))
                return loss_mean(pe_b, ix) - loss_mean(pe_s, ix)
            rows.append({"stage": "stage 1 (base -> stage 1)", "dataset": s1, "seed": None, "learning": fall(None),
                         "se": _bootstrap_se(fall, {s1: len(pe_b)}, n_boot, seed), "entries": f"base {START}"})
    lr = load_preset(preset)["stage2"]["lr"]
    ref = table[(table["family"] == "adamw") & (table["setting"] == lr) & (table["at"] == table["of"])]
    for _, r in ref.iterrows():
        sub = study.only(ref.loc[[r.name]])
        n = len(per_example(start, r["dataset"]))

        def fall(d, sub=sub):
            return float(measure_arrays(sub, d)[0][0])
        rows.append({"stage": f"stage 2, AdamW lr {lr:g} (end)", "dataset": r["dataset"], "seed": r["seed"],
                     "learning": fall(None), "entries": f"{START} {r['name']}",
                     "se": _bootstrap_se(fall, {r["dataset"]: n, s1: len(per_example(start, s1))}, n_boot, seed)})
    out = pd.DataFrame(rows)
    if not out.empty:
        out["clears the sizing rule"] = (out["learning"] >= min_nats) & (out["learning"] >= min_se * out["se"])
    return out


def end_points(points: pd.DataFrame) -> pd.DataFrame:
    """Where each setting ends: learning and forgetting at a run's last point, averaged over the seeds that
    reached it (how many: ``seeds``), per (dataset, family, setting, lr); Wise-FT merges are end points."""
    if points.empty:
        return pd.DataFrame()
    ends = points[points["at"] == points["of"]]
    keys = ["dataset", "family", "setting", "lr"]
    cols = ["learning", "forgetting"] + [c for c in ends if c.startswith("ability fall")]
    out = ends.groupby(keys, sort=False)[cols].mean()
    out.insert(0, "seeds", ends.groupby(keys, sort=False)["seed"].nunique())
    out["entries"] = ends.groupby(keys, sort=False)["name"].agg(" ".join)
    return out


def sam_gradients(study: Study | str) -> pd.DataFrame:
    """Why a SAM run may not learn: per SAM/ASAM run, the gradient norm at the weights w and at the ascent
    point w + e that SAM steps with (the trainer logs both every step), over the first quarter of the run and
    the whole of it. Where curvature along the gradient times rho dwarfs the gradient, the step follows the
    sharp direction the ascent found rather than the task's."""
    study = Study.of(study)
    if study.empty:
        return pd.DataFrame()
    entries, pts = study.entries, measures(study)
    ends = pts[pts["family"].isin(["sam", "asam"]) & (pts["at"] == pts["of"])]
    rows = []
    for _, r in ends.iterrows():
        t = entries[r["name"]].get("train") or {}
        pairs = [(a, b) for a, b in zip(t.get("grad_norm") or [], t.get("sam_grad_norm") or [])
                 if a is not None and b is not None]
        if not pairs:
            continue
        clean, at_e = np.asarray(pairs, dtype=float).T
        q = max(1, len(clean) // 4)
        rows.append({"dataset": r["dataset"], "family": r["family"], "rho": r["setting"], "lr": r["lr"],
                     "seed": r["seed"], "|g(w)|, first quarter": clean[:q].mean(),
                     "|g(w+e)|, first quarter": at_e[:q].mean(), "ratio, first quarter": (at_e[:q] / clean[:q]).mean(),
                     "ratio, whole run": (at_e / clean).mean(), "learning at the end": r["learning"],
                     "name": r["name"]})
    return pd.DataFrame(rows)


def sam_gradient_sentence(table: pd.DataFrame) -> str:
    """What ``sam_gradients`` shows across runs: how the ratio |g(w+e)| / |g(w)| ranks against learning."""
    if len(table) < 3:
        return ""
    from scipy.stats import spearmanr

    r = spearmanr(table["ratio, first quarter"], table["learning at the end"]).statistic
    return (f"Across these {len(table)} SAM runs, the rank correlation (Spearman) of |g(w+e)| / |g(w)| over the "
            f"first quarter with the learning at the end is {r:+.2f}.")


def never_learned(points: pd.DataFrame) -> pd.DataFrame:
    """The runs whose own held-out loss never fell below the stage-1 model's at any point: (dataset, family,
    setting, lr, seed), with the largest rise of that loss and the forgetting at the end point."""
    if points.empty:
        return pd.DataFrame()
    keys = ["dataset", "family", "setting", "lr", "seed"]
    rows = []
    for key, g in points.groupby(keys):
        if g["learning"].max() <= 0:
            end = g.loc[g["at"].idxmax()]
            rows.append({**dict(zip(keys, key)), "own loss rose by up to": -g["learning"].min(),
                         "forgetting at the end": end["forgetting"], "entries": " ".join(g["name"])})
    return pd.DataFrame(rows)


def _end_points(study: Study) -> tuple[dict, pd.Series]:
    """The independent stage-2 end points with a landscape (one per run: its last snapshot) and their forgetting."""
    entries, pts = study.entries, measures(study)
    ends = pts[(pts["at"] == pts["of"]) & pts["name"].map(lambda n: "landscape" in entries[n])]
    return {n: entries[n] for n in ends["name"]}, ends.set_index("name")["forgetting"]


def flatness_vs_forgetting(study: Study | str, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Over the independent stage-2 end points with a landscape, each flatness measure against forgetting (rise
    of the held-out stage-1 loss), by ``flatness.correlations``. Flatness is measured on examples disjoint from
    those that measure forgetting."""
    study = Study.of(study)
    if study.empty:
        return pd.DataFrame()
    return flatness.correlations(*_end_points(study), n_boot=n_boot, seed=seed)


POOLED = "pooled, ranked within model"


def flatness_by_model(presets: list[str], *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """``flatness_vs_forgetting`` per preset (one model each, rows by its model) and, with two models or more,
    pooled over their end points (``POOLED``): ranked and resampled within each model, so that one model being
    sharper and forgetting more than the other cannot make the correlation. Pooled entries are named
    ``<preset>/<name>``."""
    frames, entries, forgetting, groups = [], {}, {}, {}
    for preset in presets:
        study = Study.of(preset)
        if study.empty:
            continue
        model = load_preset(preset)["model"]
        own, fg = _end_points(study)
        t = flatness.correlations(own, fg, n_boot=n_boot, seed=seed)
        if not t.empty:
            frames.append(t.assign(model=model))
        for n, e in own.items():
            entries[f"{preset}/{n}"], forgetting[f"{preset}/{n}"], groups[f"{preset}/{n}"] = e, fg[n], model
    if len(set(groups.values())) > 1:
        pooled = flatness.correlations(entries, pd.Series(forgetting, dtype=float), n_boot=n_boot, seed=seed,
                                       groups=pd.Series(groups))
        if not pooled.empty:
            frames.append(pooled.assign(model=POOLED))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames).reset_index().set_index(["model", "measure"])
