"""Learning-forgetting frontiers: how much a method forgets at matched learning.

Every frontier experiment is one point: a model along a stage-2 run (``specs.frontier``). Against the
stage-1 model it starts from (experiment ``frontier-stage1``):
- **learning** = the fall of the held-out loss on the run's own stage-2 set (nats; up is more learning);
- **forgetting** = the rise of the held-out stage-1 (Alpaca) loss (nats; up is more forgetting).
A method's frontier, for one training seed, is the Pareto front of its points (the stage-1 model, at
(0, 0), included): the least forgetting reached with at least that much learning, interpolated linearly
between front points. Two methods are compared at matched learning levels L: Δ(L) = F_b(L) - F_a(L),
averaged over seeds, with a bootstrap that resamples the held-out examples (the same draw for every run:
they are the same examples) and the training seeds (paired: a seed is the same stage-1 model and data order
for both methods). Per-example losses come from the results (``heldout_loss[set]["per_example"]``).

A verdict must not hang on how forgetting is defined, so ``compare`` takes any of ``FORGETTING``: the
held-out loss as a token mean (the default) or with every example weighted alike (learning then too), and
the fall of general ability on the frontier's eval suite, per item: the gold answer's log-probability among
the choices (free of choice length and of each task's raw log-prob scale) or the task's accuracy. The eval
items are the same in every run, so they are resampled together, like the held-out examples.
"""
from __future__ import annotations

from enum import Enum

import numpy as np
import pandas as pd

from cfsam.analysis.stats import permutation_spearman
from cfsam.pipeline import specs
from cfsam.pipeline.cache import load_results
from cfsam.pipeline.presets import load_preset

START = "frontier-stage1"


def _per_example(entry: dict, dataset: str) -> np.ndarray:
    """(examples, 2): summed loss and token count of each held-out example."""
    rec = entry["heldout_loss"][dataset]
    if "per_example" not in rec:
        raise ValueError(f"entry {entry.get('name')} has no per-example losses for {dataset}: recompute it")
    return np.asarray(rec["per_example"], dtype=float)


FORGETTING = {
    "heldout": "rise of the held-out stage-1 loss, token mean (nats)",
    "heldout per example": "rise of the held-out stage-1 loss, every example alike; learning likewise (nats)",
    "gold log-prob": "fall of the gold answer's log-probability among the choices, mean over tasks of the "
                     "item mean (nats)",
    "accuracy": "fall of accuracy (each task's primary metric), mean over tasks of the item mean",
}
EVAL_KEYS = {"gold log-prob": "gold_choice_logprob", "accuracy": None}  # None: the task's primary metric


def _eval_items(entry: dict) -> dict[str, dict]:
    """Per eval task: item indices and per-item values of each eval measure, as arrays (sorted by item)."""
    out = {}
    for task, t in ((entry.get("eval") or {}).get("tasks") or {}).items():
        if t.get("status") != "ok" or not t.get("records"):
            continue
        recs = sorted(t["records"], key=lambda r: r["idx"])
        primary = t["primary"] if t["primary"] in recs[0] else "acc"
        out[task] = {"idx": np.array([r["idx"] for r in recs]),
                     **{m: np.array([float(r[k or primary]) for r in recs]) for m, k in EVAL_KEYS.items()}}
    return out


def _family(d: dict) -> str:
    """AdamW, SAM, ASAM, rehearsal, Wise-FT; rehearsal with SAM and Wise-FT of a SAM run are families of their
    own (the paper's complementarity claims compare them with rehearsal and Wise-FT of AdamW)."""
    sam = d["optimizer"] == "sam"
    if d["method"] in ("wise_ft", "rehearsal"):
        return ("sam_" if sam and not d["adaptive"] else "asam_" if sam else "") + d["method"]
    return ("asam" if d["adaptive"] else "sam") if sam else "adamw"


def point_row(name: str, run: dict) -> dict:
    """What places an experiment among the frontier's points: its set, family, setting, lr, seed and at/of."""
    d = specs.describe(run)
    fam = _family(d)
    setting = {"adamw": d["lr"], "sam": d["rho"], "asam": d["rho"]}.get(
        fam, d["alpha"] if d["method"] == "wise_ft" else d["rehearsal_fraction"])
    return {"name": name, "dataset": d["stage2"], "family": fam, "setting": setting, "lr": d["lr"],
            "seed": d["seed"], "at": d["at"] or 1, "of": d["of"] or 1}


def arrays(entry: dict) -> dict:
    """An entry with its per-example losses and eval items as arrays (the bootstrap reads them on every draw)."""
    for rec in (entry.get("heldout_loss") or {}).values():
        if "per_example" in rec:
            rec["per_example"] = np.asarray(rec["per_example"], dtype=float)
    entry["eval_items"] = _eval_items(entry)
    return entry


def collect(preset: str) -> tuple[dict, pd.DataFrame]:
    """The stage-1 entry and one row per frontier point present: name, dataset, family, setting, seed, at/of."""
    exps = specs.expand(preset)
    names = [n for n, e in exps.items() if e.get("group") == "frontier" and n != START]
    entries = {n: e for n, e in load_results(preset, [START, *names]).items() if e["status"] == "ok"} \
        if START in exps else {}
    if START not in entries:
        return {}, pd.DataFrame()
    rows = [point_row(n, exps[n]["run"]) for n in names if n in entries]
    out = {"start": entries[START], **{r["name"]: entries[r["name"]] for r in rows}}
    for e in out.values():
        arrays(e)
    return out, pd.DataFrame(rows)


def _stage1_set(start: dict) -> str:
    return start["spec"]["measure"]["heldout"]["datasets"][0]  # the stage-1 set comes first


def _mean(pe: np.ndarray, idx: np.ndarray, per_example: bool = False) -> float:
    sub = pe[idx]
    if per_example:  # every example alike (one with no response token left has none to weigh)
        sub = sub[sub[:, 1] > 0]
        return float(np.mean(sub[:, 0] / sub[:, 1]))
    return float(sub[:, 0].sum() / max(sub[:, 1].sum(), 1.0))


def _suite(entries: dict) -> list[str]:
    """The eval tasks every entry scored on the same items (the frontier's suite)."""
    start = entries["start"]["eval_items"]
    tasks = [t for t in start if all(t in e["eval_items"] for e in entries.values())]
    for t in tasks:
        for e in entries.values():
            if not np.array_equal(e["eval_items"][t]["idx"], start[t]["idx"]):
                raise ValueError(f"entry {e.get('name')}: task {t} was scored on other items than the stage-1 "
                                 "model's; recompute it")
    return tasks


def draw_sizes(entries: dict, dataset: str, forgetting: str = "heldout") -> dict:
    """What the bootstrap resamples for a measure: held-out sets by name, eval tasks as ("eval", task)."""
    start = entries["start"]
    sizes = {dataset: len(_per_example(start, dataset))}
    if forgetting in EVAL_KEYS:
        sizes.update({("eval", t): len(start["eval_items"][t]["idx"]) for t in _suite(entries)})
    else:
        sizes[_stage1_set(start)] = len(_per_example(start, _stage1_set(start)))
    return sizes


def measures(entries: dict, table: pd.DataFrame, draws: dict | None = None,
             forgetting: str = "heldout") -> pd.DataFrame:
    """Learning and forgetting (as ``FORGETTING[forgetting]`` defines it) of every point, on the held-out
    examples and eval items ``draws`` (all when None; keys as ``draw_sizes``)."""
    if forgetting not in FORGETTING:
        raise ValueError(f"unknown forgetting measure {forgetting!r}; allowed: {', '.join(FORGETTING)}")
    start = entries["start"]
    stage1_set = _stage1_set(start)
    per_ex = forgetting == "heldout per example"
    tasks = []
    if forgetting in EVAL_KEYS:  # a bootstrap draw names the tasks ``draw_sizes`` checked: not again per draw
        tasks = [k[1] for k in draws if isinstance(k, tuple)] if draws else _suite(entries)
    if forgetting in EVAL_KEYS and not tasks:
        raise ValueError(f"forgetting measure {forgetting!r} needs eval items in every entry; none are shared")

    def idx(key, n):
        return draws[key] if draws else np.arange(n)

    def ability(e):
        return np.mean([e["eval_items"][t][forgetting][idx(("eval", t), len(e["eval_items"][t]["idx"]))].mean()
                        for t in tasks])

    out = table.copy()
    learn, forget = [], []
    for _, row in table.iterrows():
        e, own = entries[row["name"]], row["dataset"]
        i_own = idx(own, len(_per_example(start, own)))
        learn.append(_mean(_per_example(start, own), i_own, per_ex) - _mean(_per_example(e, own), i_own, per_ex))
        if tasks:
            forget.append(ability(start) - ability(e))
        else:
            i_s1 = idx(stage1_set, len(_per_example(start, stage1_set)))
            forget.append(_mean(_per_example(e, stage1_set), i_s1, per_ex)
                          - _mean(_per_example(start, stage1_set), i_s1, per_ex))
    out["learning"], out["forgetting"] = learn, forget
    return out


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


def _curves(points: pd.DataFrame, family: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    sub = points[points["family"] == family]
    return {seed: pareto_curve(g["learning"].to_numpy(), g["forgetting"].to_numpy()) for seed, g in sub.groupby("seed")}


_NOTHING = (np.array([0.0, np.inf]), np.array([0.0, 0.0]))  # family "none": the stage-1 model forgets nothing


SETTINGS = {"every seed": "only the settings every seed ran",
            "all": "every setting a seed ran"}  # the first seed also runs the sweep's extra points: a sensitivity


def every_seed(table: pd.DataFrame, seeds) -> pd.DataFrame:
    """The rows of the settings (family, setting and lr) that every one of ``seeds`` ran."""
    ran = table.groupby(["family", "setting", "lr"])["seed"].agg(set)
    keep = {k for k, v in ran.items() if set(seeds) <= v}
    return table[[k in keep for k in zip(table["family"], table["setting"], table["lr"])]]


def compare(preset: str, dataset: str, a: str = "adamw", b: str = "sam", *, levels=(0.25, 0.5, 0.75),
            n_boot: int = 1000, seed: int = 0, forgetting: str = "heldout", settings: str = "every seed",
            front: str = "linear", collected=None) -> pd.DataFrame:
    """Δ forgetting (b - a) at matched learning: one row per level, given as a fraction of the learning both
    methods reach on every seed; the point estimate, a 95 % bootstrap interval (held-out examples, eval
    items and seeds resampled) and the verdict. ``forgetting``: one of ``FORGETTING``; ``settings``: one of
    ``SETTINGS``, which points build each seed's front (with "every seed", every seed's front is built from the
    same sweep); ``front``: one of ``FRONTS``; ``a="none"`` compares b with the stage-1 model (no forgetting at
    any learning)."""
    if front not in FRONTS:
        raise ValueError(f"unknown front {front!r}; allowed: {', '.join(FRONTS)}")
    if forgetting not in FORGETTING:
        raise ValueError(f"unknown forgetting measure {forgetting!r}; allowed: {', '.join(FORGETTING)}")
    if settings not in SETTINGS:
        raise ValueError(f"unknown settings {settings!r}; allowed: {', '.join(SETTINGS)}")
    entries, table = collected or collect(preset)
    if table.empty:
        return pd.DataFrame()
    table = table[(table["dataset"] == dataset) & table["family"].isin([a, b])]
    seeds = sorted(set(table[table["family"] == b]["seed"]) &
                   (set(table[table["family"] == a]["seed"]) if a != "none" else set(table["seed"])))
    if not seeds:
        return pd.DataFrame()
    table = table[table["seed"].isin(seeds)]
    if settings == "every seed":
        table = every_seed(table, seeds)
    entries = {k: v for k, v in entries.items() if k == "start" or k in set(table["name"])}
    sizes = draw_sizes(entries, dataset, forgetting)

    def delta(draws, seed_draw):
        pts = measures(entries, table, draws, forgetting)
        ca, cb = (_curves(pts, a) if a != "none" else {s: _NOTHING for s in seeds}), _curves(pts, b)
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


FAMILIES = ("sam", "asam", "rehearsal", "wise_ft")  # each compared with AdamW at matched learning


def _sets(table: pd.DataFrame) -> list[str]:
    """The stage-2 sets with frontier points in ``collect``'s table, in their order there."""
    return list(table["dataset"].unique()) if not table.empty else []


def verdicts(preset: str, a: str = "adamw", families=FAMILIES, *, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """``compare`` of every family in ``families`` with ``a``, on every stage-2 set with frontier points: Δ
    forgetting at a quarter, half and three quarters of the common reach (rows of families without points
    are left out)."""
    collected = collect(preset)
    rows = [compare(preset, ds, a, b, n_boot=n_boot, seed=seed, collected=collected)
            for ds in _sets(collected[1]) for b in families]
    rows = [t for t in rows if not t.empty]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def robustness(preset: str, dataset: str | None = None, a: str = "adamw", b: str = "sam", *, level: float = 0.5,
               n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """The verdict of ``compare`` at one matched-learning level under every definition of forgetting in
    ``FORGETTING`` (each seed's front built from the settings every seed ran), once with the first seed's extra
    settings too (``SETTINGS``: "all") and once under the conservative step front (``FRONTS``);
    whether each agrees with the default's (a verdict must not flip with the definition). ``dataset=None``:
    every stage-2 set with frontier points, one after the other."""
    collected = collect(preset)
    out = []
    for ds in [dataset] if dataset else _sets(collected[1]):
        rows = []
        variants = [(m, "every seed", "linear") for m in FORGETTING] + [("heldout", "all", "linear"),
                                                                         ("heldout", "every seed", "step")]
        for measure, settings, front in variants:
            try:
                t = compare(preset, ds, a, b, levels=(level,), n_boot=n_boot, seed=seed, forgetting=measure,
                            settings=settings, front=front, collected=collected)
            except ValueError as err:  # e.g. no eval items shared: say so in the table
                t = pd.DataFrame([{"dataset": ds, "comparison": f"{b} vs {a}", "verdict": f"not computable: {err}",
                                   "effect": None, "forgetting measure": measure, "frontier from": SETTINGS[settings],
                                   "front": front}])
            rows.append(t)
        t = pd.concat(rows, ignore_index=True)
        if not t.empty:
            out.append(t.assign(**{"same verdict as the default": t["effect"] == t["effect"].iloc[0]}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


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
            ds = specs.describe(exps[name]["run"])["stage2"] if col == "learning" else _stage1_set(start)
            bd = claims.heldout_pair(start, entries[name], ds, draws, rng, n_boot)
            bounds.append(sorted(sign * np.percentile(bd, [2.5, 97.5])) if bd is not None else [np.nan, np.nan])
        at = lf.columns.get_loc(col) + 1
        lf.insert(at, f"{col} low", [b[0] for b in bounds])
        lf.insert(at + 1, f"{col} high", [b[1] for b in bounds])
    return lf


def points(preset: str) -> pd.DataFrame:
    """Every frontier point with its learning and forgetting (all held-out examples), for tables and plots."""
    entries, table = collect(preset)
    if table.empty:
        return table
    out = measures(entries, table)
    if _suite(entries):  # learning beside every forgetting measure: the fall of general ability too
        for m in EVAL_KEYS:
            out[f"ability fall ({m})"] = measures(entries, table, forgetting=m)["forgetting"]
    return out


def _bootstrap_se(fn, sizes: dict, n_boot: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return float(np.std([fn({k: rng.integers(0, n, n) for k, n in sizes.items()}) for _ in range(n_boot)], ddof=1))


def learning_check(preset: str, *, n_boot: int = 500, seed: int = 0, min_nats: float = 0.1,
                   min_se: float = 4.0, collected=None) -> pd.DataFrame:
    """Does each stage learn what it is said to? Stage 1 (base model -> ``frontier-stage1`` on its own
    held-out set, when the base model is measured) and every AdamW run of the preset's stage-2 learning rate
    at its end point: the fall of its own held-out loss, a bootstrap standard error over the held-out
    examples, and whether it clears ``min_nats`` and ``min_se`` standard errors (the study's sizing rule).
    ``collected``: ``collect(preset)``'s result, when the caller has it already."""
    entries, table = collected or collect(preset)
    if table.empty:
        return pd.DataFrame()
    start, rows = entries["start"], []
    s1 = _stage1_set(start)
    base = load_results(preset, ["base"]).get("base", {}) if "base" in specs.expand(preset) else {}
    if base.get("status") == "ok" and "per_example" in (base.get("heldout_loss") or {}).get(s1, {}):
        pe_b, pe_s = np.asarray(base["heldout_loss"][s1]["per_example"], float), _per_example(start, s1)
        if len(pe_b) == len(pe_s):  # the same held-out examples (an entry without per-example losses: no row)
            def fall(d, ix=None):
                ix = d[s1] if d else np.arange(len(pe_b))
                return _mean(pe_b, ix) - _mean(pe_s, ix)
            rows.append({"stage": "stage 1 (base -> stage 1)", "dataset": s1, "seed": None, "learning": fall(None),
                         "se": _bootstrap_se(fall, {s1: len(pe_b)}, n_boot, seed)})
    lr = load_preset(preset)["stage2"]["lr"]
    ref = table[(table["family"] == "adamw") & (table["setting"] == lr) & (table["at"] == table["of"])]
    for _, r in ref.iterrows():
        pts = ref.loc[[r.name]]
        n = len(_per_example(start, r["dataset"]))

        def fall(d):
            return float(measures(entries, pts, d)["learning"].iloc[0])
        rows.append({"stage": f"stage 2, AdamW lr {lr:g} (end)", "dataset": r["dataset"], "seed": r["seed"],
                     "learning": fall(None), "se": _bootstrap_se(fall, {r["dataset"]: n, s1: len(_per_example(start, s1))},
                                                                 n_boot, seed)})
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
    return out


def sam_gradients(preset: str) -> pd.DataFrame:
    """Why a SAM run may not learn: per SAM/ASAM run, the gradient norm at the weights w and at the ascent
    point w + e that SAM steps with (the trainer logs both every step), over the first quarter of the run and
    the whole of it. Where curvature along the gradient times rho dwarfs the gradient, the step follows the
    sharp direction the ascent found rather than the task's."""
    entries, table = collect(preset)
    if table.empty:
        return pd.DataFrame()
    pts = measures(entries, table)
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
                     "ratio, whole run": (at_e / clean).mean(), "learning at the end": r["learning"]})
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
                         "forgetting at the end": end["forgetting"]})
    return pd.DataFrame(rows)


def curves(points: pd.DataFrame) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Every (dataset, family, seed)'s Pareto front, for plotting."""
    return {(ds, fam, seed): pareto_curve(g["learning"].to_numpy(), g["forgetting"].to_numpy())
            for (ds, fam, seed), g in points.groupby(["dataset", "family", "seed"])}


FLATNESS = {"SC": ("flatness", "SC"), "AG": ("flatness", "AG"), "MAG": ("flatness", "MAG"),
            "Hessian top eigenvalue": ("curvature", "hessian_top_eigenvalue"),
            "Hessian trace": ("curvature", "hessian_trace"), "SAM sharpness": ("curvature", "sam_sharpness")}
# every one of them is larger for a sharper model (book/methods.md): rho > 0 ranks "sharper forgets more"


def flatness_vs_forgetting(preset: str) -> pd.DataFrame:
    """Over the independent stage-2 end points with a landscape (one per run: the last snapshot), each flatness
    measure against forgetting (rise of the held-out stage-1 loss): Spearman's rho, its permutation p-value,
    and which way it ranks. Flatness is measured on examples disjoint from those that measure forgetting."""
    entries, table = collect(preset)
    if table.empty:
        return pd.DataFrame()
    pts = measures(entries, table)
    ends = pts[(pts["at"] == pts["of"]) & pts["name"].map(lambda n: "landscape" in entries[n])]
    rows = []
    for label, (part, key) in FLATNESS.items():
        vals = ends["name"].map(lambda n: (entries[n]["landscape"].get(part) or {}).get(key))
        vals = vals.map(lambda v: v.get("mean") if isinstance(v, dict) else v).astype(float)
        # an estimate flagged unconverged (cfsam.measurement.curvature.CONVERGED_TOL) is left out
        flagged = ends["name"].map(lambda n: (entries[n]["landscape"].get(part) or {}).get(f"{key}_converged") is False)
        ok = vals.notna() & ends["forgetting"].notna() & ~flagged.astype(bool)
        if ok.sum() < 3:
            continue
        rho, p, how = permutation_spearman(vals[ok], ends.loc[ok, "forgetting"])
        ranks = "sharper forgets more" if rho > 0 else "flatter forgets more"
        rows.append({"measure": label, "runs": int(ok.sum()), "Spearman rho": rho, "p": p, "p from": how,
                     "ranks": ranks, "the paper's way": ranks == "sharper forgets more"})
    return pd.DataFrame(rows).set_index("measure") if rows else pd.DataFrame()
