"""The paper's claims, checked on our cached runs with paired bootstrap intervals.

Two runs of a preset are scored on the same seeded eval items, so their difference is paired: each
bootstrap replicate resamples the items of every task (the same draw for every run) and recomputes the
paper's arithmetic (task score, category mean of its tasks, AVG of the categories; MMLU the mean over
its subjects), so the point estimate is exactly the Delta the tables print. Two measures:

- ``score``: the tasks' primary metric (accuracy; MC2 probability for TruthfulQA MC2), in points;
- ``gold_choice_logprob``: the log-probability of the gold answer(s) among the choices (nats), which
  moves when a model at chance stops or starts preferring the gold without the argmax changing. The
  choices are compared as the task's metric compares them: by summed log-likelihood, or, where it
  normalises by length (acc_norm per character, acc_tok per token), by the per-unit log-likelihood
  times the choices' mean length, so that a long choice is not improbable merely for being long
  (csl_dev's two texts differ by a whole keyword line, HellaSwag's endings by many tokens).

The held-out stage-1 (Alpaca) loss is the third measure: every run of a preset scores the same held-out
examples, so a replicate resamples them (the same draw for every pair) and recomputes each run's token
mean; its verdict flips the sign of the claim (a model that keeps more has a lower loss). Entries computed
before the cache stored per-example losses have its Δ without an interval; for those, the count of pairs
whose loss moves the paper's way is what is left. The held-out loss on b's own stage-2 set (down is
learning) is shown beside each pair, with its paired interval: where the run the paper says keeps more
learned clearly less of the same set, the claim is marked *confounded by learning* (it may keep more
only because it moved less), and the frontier's matched-learning view is the one to read.

The claims themselves are data (``registry/claims.yaml``): which runs each compares and which way the
paper says the difference goes. A verdict is ``reproduced`` when the 95% interval lies on the paper's
side of zero, ``opposite`` when it lies on the other, ``inconclusive`` when it covers zero.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from cfsam.core import registry as registry_
from cfsam.core.errors import UsageError
from cfsam.evaluation import tasks
from cfsam.pipeline.cache import load_results
from cfsam.evaluation.metrics import paper_avg
from cfsam.pipeline import runs, specs

MEASURES = {"score": ("Δ AVG (points)", 100.0), "gold_choice_logprob": ("Δ gold log-prob among choices (nats)", 1.0)}
HELDOUT = "Δ held-out stage-1 loss (nats)"
LEARNED = "Δ held-out loss on b's stage-2 set (nats)"  # down: b learned its set more than a did
VERDICTS = ("reproduced", "opposite", "inconclusive", "not run")


@lru_cache(maxsize=1)
def registry() -> list[dict]:
    """The claims, each one's ``stage2`` (the sets the paper makes it on) checked against the datasets."""
    out = list(registry_.entries("claims").values())
    for claim in out:
        for ds in claim.get("stage2", []):
            registry_.entry("datasets", ds)  # an unknown set names itself and the allowed ones
    return out


def claim_sets(claim: dict, sets: list[str]) -> list[str]:
    """Those of ``sets`` the paper makes ``claim`` on (its ``stage2`` list; every set when it has none)."""
    return [ds for ds in sets if ds in claim.get("stage2", sets)]


# ------------------------------------------------------------------------------ the arithmetic
def _task_arrays(entries: list[dict], measure: str) -> dict[str, dict]:
    """Per task present (status ok) in every entry: the per-item values of each entry, and the groups."""
    out = {}
    for cat, names in tasks.paper_tasks().items():
        for name in names:
            res = [e["eval"]["tasks"].get(name, {}) for e in entries]
            if not all(r.get("status") == "ok" for r in res):
                continue
            idx = [[rec["idx"] for rec in r["records"]] for r in res]
            if any(i != idx[0] for i in idx):
                raise UsageError(f"task {name!r}: the runs were scored on different items; compare runs of one preset")
            primary = res[0]["primary"]
            value = (lambda rec: rec[primary]) if measure == "score" else (lambda rec: choice_logprob(rec, primary))
            values = np.array([[value(rec) for rec in r["records"]] for r in res], dtype=float)
            macro = tasks.task_spec(name).get("aggregate") == "macro"
            groups = np.unique([rec["group"] for rec in res[0]["records"]], return_inverse=True)[1] if macro else None
            out[name] = {"category": cat, "values": values, "groups": groups}
    return out


def choice_logprob(rec: dict, primary: str) -> float:
    """Log-probability of the gold choice(s) among the choices, scored at equal length where the task's
    metric normalises by length (see the module docstring)."""
    ll = np.asarray(rec["ll"], dtype=float)
    if primary == "acc_norm":
        norm = np.asarray(rec["ll_norm"], dtype=float)
        length = np.divide(ll, norm, out=np.ones_like(ll), where=norm != 0)  # characters of each choice
    elif primary == "acc_tok":
        length = np.asarray(rec["n_tokens"], dtype=float)
    else:
        length = np.ones_like(ll)
    s = ll / length * length.mean()
    golds = rec["gold"] if isinstance(rec["gold"], list) else [rec["gold"]]
    return float(np.logaddexp.reduce(s[golds]) - np.logaddexp.reduce(s))


def _task_score(values: np.ndarray, groups: np.ndarray | None, draw: np.ndarray) -> np.ndarray:
    """Score of every run on the items ``draw`` (indices, repeats allowed): mean, or mean of group means."""
    v = values[:, draw]
    if groups is None:
        return v.mean(axis=1)
    g = groups[draw]
    counts = np.bincount(g, minlength=groups.max() + 1)
    sums = np.stack([np.bincount(g, weights=row, minlength=len(counts)) for row in v])
    present = counts > 0
    return (sums[:, present] / counts[present]).mean(axis=1)


def avg_with_bootstrap(entries: list[dict], measure: str = "score", *, n_boot: int = 2000,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The paper's AVG of each entry (shape [runs]) and its bootstrap replicates (shape [n_boot, runs]),
    items resampled within each task, the same draw for every entry."""
    arrays = _task_arrays(entries, measure)
    if not arrays:
        raise UsageError("no task was scored in every run")
    category_of = {n: a["category"] for n, a in arrays.items()}
    point = paper_avg({n: _task_score(a["values"], a["groups"], np.arange(a["values"].shape[1]))
                  for n, a in arrays.items()}, category_of)
    rng = np.random.default_rng(seed)
    draws = {n: rng.integers(0, a["values"].shape[1], size=(n_boot, a["values"].shape[1])) for n, a in arrays.items()}
    boots = np.stack([paper_avg({n: _task_score(a["values"], a["groups"], draws[n][b]) for n, a in arrays.items()},
                           category_of) for b in range(n_boot)])
    return point, boots


def _token_means(per_example: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The token-mean loss of each replicate: draws (n_boot, n) of rows of (summed loss, tokens)."""
    return per_example[draws, 0].sum(axis=-1) / per_example[draws, 1].sum(axis=-1)


def heldout_pair(ea: dict, eb: dict, dataset: str, draws: dict, rng, n_boot: int) -> np.ndarray | None:
    """Bootstrap replicates of b's minus a's held-out token-mean loss on ``dataset``, or None without the
    per-example losses of the same examples in both (the token counts must agree)."""
    pe = [e["heldout_loss"][dataset].get("per_example") for e in (ea, eb)]
    if any(p is None for p in pe):
        return None
    pa, pb = (np.asarray(p, dtype=float) for p in pe)
    if pa.shape != pb.shape or not np.array_equal(pa[:, 1], pb[:, 1]):
        return None
    if len(pa) not in draws:  # one draw of the examples for every pair: the pooled interval stays paired
        draws[len(pa)] = rng.integers(0, len(pa), size=(n_boot, len(pa)))
    return _token_means(pb, draws[len(pa)]) - _token_means(pa, draws[len(pa)])


def verdict_column(label: str) -> str:
    """The column of ``check`` with a measure's verdict: 'Δ AVG (points)' -> 'verdict (Δ AVG)'."""
    return f"verdict ({label.split(' (')[0]})"


def verdict(low: float, high: float, expect: str) -> str:
    """``expect`` is the paper's sign of (b - a): 'up' or 'down'."""
    if np.isnan(low) or np.isnan(high):
        return "not run"
    if low <= 0 <= high:
        return "inconclusive"
    return "reproduced" if (low > 0) == (expect == "up") else "opposite"


# ------------------------------------------------------------------------------------ claims
def pairs_of(claim: dict, preset: str) -> list[tuple[str, str]]:
    """The claim's (a, b) experiment names in this preset, ``{stage2}`` (over the claim's sets) and ``{size}``
    (over the preset's other model sizes) expanded; none for a claim across sizes in a preset of one model."""
    from cfsam.pipeline.presets import load_preset

    p = load_preset(preset)
    sizes = [m for m in p["sizes"] if m != p["model"]]
    if not sizes and any("{size}" in a + b for a, b in claim["pairs"]):
        return []  # a claim across sizes, in a preset of one model: nothing to compare
    out = []
    for a, b in claim["pairs"]:
        for ds in claim_sets(claim, p["stage2_datasets"]) if "{stage2}" in a + b else [None]:
            for size in sizes if "{size}" in a + b else [None]:
                out.append(tuple(x.format(stage2=ds, size=size) for x in (a, b)))
    return out


def compare_pairs(preset: str, pairs: list[tuple[str, str]], *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per pair (a -> b): Δ AVG and Δ gold-choice log-prob with 95% intervals, Δ held-out losses, and the
    pooled mean over all pairs (one bootstrap draw shared by every run, so the pooled interval is paired too)."""
    names = sorted({n for pair in pairs for n in pair} & set(specs.expand(preset)))
    entries = {n: e for n, e in load_results(preset, names).items() if e["status"] == "ok"}
    ready = [(a, b) for a, b in pairs if a in entries and b in entries]
    rows = {f"{a} → {b}": {"a": a, "b": b} for a, b in pairs}
    order = sorted({n for pair in ready for n in pair})
    for measure, (label, scale) in MEASURES.items():
        if not ready:
            break
        point, boots = avg_with_bootstrap([entries[n] for n in order], measure, n_boot=n_boot, seed=seed)
        col = {n: i for i, n in enumerate(order)}
        diffs, boot_diffs = [], []
        for a, b in ready:
            d, bd = scale * (point[col[b]] - point[col[a]]), scale * (boots[:, col[b]] - boots[:, col[a]])
            lo, hi = np.percentile(bd, [2.5, 97.5])
            rows[f"{a} → {b}"].update({label: d, f"{label} low": lo, f"{label} high": hi})
            diffs.append(d)
            boot_diffs.append(bd)
        if len(ready) > 1:
            lo, hi = np.percentile(np.mean(boot_diffs, axis=0), [2.5, 97.5])
            rows.setdefault("pooled (mean of pairs)", {"a": "", "b": ""}).update(
                {label: float(np.mean(diffs)), f"{label} low": lo, f"{label} high": hi})
    rng, draws, loss_diffs, loss_boots = np.random.default_rng(seed), {}, [], []
    # b's own stage-2 set: one draw per set, shared by its pairs; its own generator leaves the stage-1 draws as they were
    own_rng, own_draws, own_diffs, own_boots = np.random.default_rng(seed + 1), {}, [], []
    for key, row in rows.items():
        if row["a"] in entries and row["b"] in entries:
            ea, eb = entries[row["a"]], entries[row["b"]]
            la, lb = ea["heldout_loss"], eb["heldout_loss"]
            stage1 = ea["spec"]["measure"]["heldout"]["datasets"][0]  # stage 1's set comes first
            row[HELDOUT] = lb[stage1]["loss"] - la[stage1]["loss"]
            bd = heldout_pair(ea, eb, stage1, draws, rng, n_boot)
            if bd is not None:
                row[f"{HELDOUT} low"], row[f"{HELDOUT} high"] = np.percentile(bd, [2.5, 97.5])
                loss_boots.append(bd)
            loss_diffs.append(row[HELDOUT])
            own = specs.describe(eb["spec"]["run"])["stage2"]
            if own and own in la and own in lb and own != stage1:
                row[LEARNED] = lb[own]["loss"] - la[own]["loss"]
                bd = heldout_pair(ea, eb, own, own_draws.setdefault(own, {}), own_rng, n_boot)
                if bd is not None:
                    row[f"{LEARNED} low"], row[f"{LEARNED} high"] = np.percentile(bd, [2.5, 97.5])
                    own_boots.append(bd)
                own_diffs.append(row[LEARNED])
                # learning is comparable only on one set: a run of stage 2 against another of the same set
                row["same stage-2 set"] = specs.describe(ea["spec"]["run"])["stage2"] == own
    pooled_rows = [(HELDOUT, loss_diffs, loss_boots), (LEARNED, own_diffs, own_boots)]
    for label, diffs, boots in pooled_rows:
        if len(diffs) > 1 and len(diffs) == len(loss_diffs):  # every pair, or no pooled value
            pooled = rows.setdefault("pooled (mean of pairs)", {"a": "", "b": ""})
            pooled[label] = float(np.mean(diffs))
            if len(boots) == len(diffs):  # an interval only when every pair has one
                pooled[f"{label} low"], pooled[f"{label} high"] = np.percentile(np.mean(boots, axis=0), [2.5, 97.5])
    if LEARNED in rows.get("pooled (mean of pairs)", {}):
        rows["pooled (mean of pairs)"]["same stage-2 set"] = all(
            r["same stage-2 set"] for k, r in rows.items() if k != "pooled (mean of pairs)" and LEARNED in r)
    return pd.DataFrame(list(rows.values()), index=pd.Index(list(rows), name="a → b"))


def check(preset: str, claim_ids: list[str] | None = None, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per claim: the paper's statement and table, the pairs compared, the pooled Δ AVG and
    Δ gold-choice log-prob with intervals, and the verdict for each measure."""
    claims = registry()
    known = [c["id"] for c in claims]
    bad = [c for c in claim_ids or [] if c not in known]
    if bad:
        raise UsageError(f"unknown claim(s) {', '.join(bad)}; allowed: {', '.join(known)}")
    rows = []
    for claim in claims:
        if claim_ids and claim["id"] not in claim_ids:
            continue
        pairs = pairs_of(claim, preset)
        table = compare_pairs(preset, pairs, n_boot=n_boot, seed=seed) if pairs else pd.DataFrame()
        # the pooled row, or the one pair computed so far (the others missing from the cache)
        each = table.drop(index="pooled (mean of pairs)", errors="ignore")
        done = each[each.drop(columns=["a", "b"]).notna().any(axis=1)] if len(each) else each
        summary = table.loc["pooled (mean of pairs)"] if "pooled (mean of pairs)" in table.index else (
            done.iloc[0] if len(done) == 1 else pd.Series(dtype=float))
        row = {"claim": claim["id"], "paper says": claim["claim"], "where": claim["where"], "pairs": len(pairs),
               "pairs computed": len(done), "per pair": "–"}
        row.update(read(summary, claim["expect"]))
        if claim.get("every") and len(done) > 1:  # "at every size": a verdict only where every pair gives it
            per = {r["b"]: read(r, claim["expect"]) for _, r in done.iterrows()}
            for col in [c for c in row if c.startswith("verdict (")]:
                said = {p[col] for p in per.values()}
                row[col] = said.pop() if len(said) == 1 else "inconclusive"
            exps = specs.expand(preset)
            row["per pair"] = "; ".join(
                f"{runs.parse(exps[b]['run']).base_model()} (`{b}`) {p[verdict_column(MEASURES['score'][0])]} by Δ AVG, "
                f"{p[verdict_column(HELDOUT)]} by held-out Alpaca loss" for b, p in per.items())
        # entries without per-example losses have no interval: count the pairs that move the paper's way
        loss = each.get(HELDOUT, pd.Series(dtype=float)).dropna()
        agree = int(((loss < 0) if claim["expect"] == "up" else (loss > 0)).sum())
        row["held-out stage-1 loss: pairs the paper's way"] = f"{agree} of {len(loss)}" if len(loss) else "–"
        rows.append(row)
    return pd.DataFrame(rows).set_index("claim")


def read(pair: pd.Series, expect: str) -> dict:
    """Δ, 95% interval and verdict of each measure, and the learning beside them, from one row of
    ``compare_pairs`` (a pair, or the pooled mean of a claim's pairs)."""
    row = {}
    for label, _ in MEASURES.values():
        d, lo, hi = (float(pair.get(k, np.nan)) for k in (label, f"{label} low", f"{label} high"))
        row[label] = d
        row[f"{label} 95% CI"] = f"[{lo:+.2f}, {hi:+.2f}]" if not np.isnan(lo) else "–"
        row[verdict_column(label)] = verdict(lo, hi, expect)
    # a lower loss is the paper's "keeps more": the loss's verdict takes the claim's sign flipped
    d, lo, hi = (float(pair.get(k, np.nan)) for k in (HELDOUT, f"{HELDOUT} low", f"{HELDOUT} high"))
    row[HELDOUT] = d
    row[f"{HELDOUT} 95% CI"] = f"[{lo:+.3f}, {hi:+.3f}]" if not np.isnan(lo) else "–"
    flipped = "down" if expect == "up" else "up"
    row[verdict_column(HELDOUT)] = (verdict(lo, hi, flipped) if not np.isnan(lo) else
                                    "no interval" if not np.isnan(d) else "not run")
    return {**row, **learning(pair, expect)}


def learning(pair: pd.Series, expect: str) -> dict:
    """What b learned of its own stage-2 set against a (``LEARNED``, with its interval), and whether that confounds
    the claim: the run the paper says keeps more (b when ``expect`` is 'up', else a) learned clearly less of the
    same set, so it may keep more only because it moved less. A fixed-recipe pair can say no more; the frontier
    compares at matched learning."""
    d, lo, hi = (float(pair.get(k, np.nan)) for k in (LEARNED, f"{LEARNED} low", f"{LEARNED} high"))
    if np.isnan(lo):
        return {LEARNED: d, f"{LEARNED} 95% CI": "–", "learning": "–" if np.isnan(d) else "no interval",
                "confounded by learning": False}
    less_b, more_b = lo > 0, hi < 0  # a higher own-set loss: b learned less
    same = pair.get("same stage-2 set")
    same = isinstance(same, (bool, np.bool_)) and bool(same)  # NaN where a pair has no own-set loss
    said = "b learned less" if less_b else "b learned more" if more_b else "alike"
    keeper_less = less_b if expect == "up" else more_b
    return {LEARNED: d, f"{LEARNED} 95% CI": f"[{lo:+.3f}, {hi:+.3f}]", "learning": said,
            "confounded by learning": bool(keeper_less and same)}


def summary(table: pd.DataFrame) -> str:
    """One sentence counting the verdicts of ``check``'s table, per measure."""
    parts = []
    for label in [m[0] for m in MEASURES.values()] + [HELDOUT]:
        col = verdict_column(label)
        counts = table[col].value_counts() if col in table else pd.Series(dtype=int)
        kinds = VERDICTS + (("no interval",) if counts.get("no interval", 0) else ())
        parts.append(f"by {label.split(' (')[0]}: " + ", ".join(f"{int(counts.get(v, 0))} {v}" for v in kinds))
    return f"Of the paper's {len(table)} claims, " + "; ".join(parts) + "."
