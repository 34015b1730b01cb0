"""Does a flatter start forget less? Stage 1 with SAM, then the same AdamW stage 2 (``specs.starts``).

Watts et al. (ICML 2026, "Sharpness-Aware Pretraining Mitigates Catastrophic Forgetting") make the starting
point flatter with SAM and fine-tune it normally. Here the starting point is the stage-1 (Alpaca) model:
``frontier-stage1`` (AdamW) and ``frontier-stage1-sam-rho<r>`` (SAM, all else alike), each measured with its
landscape on examples disjoint from the held-out ones (``frontier-stage1-flatness`` for AdamW's). From each, the
frontier's AdamW stage 2 on the headline set. Learning is always against the run's own start; forgetting is
read two ways, against its own start and against the common base model, so that a start that learned Alpaca
less cannot pass for one that forgets less. Each SAM start is compared with the AdamW start in the frontier's
two views (``fronts.compare`` at matched learning, ``verdicts.same_lr`` at the same lr); a view's verdict is
the paper-style "reproduced" when the flatter start forgets less.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cfsam.analysis import flatness
from cfsam.analysis.fronts import compare, every_seed, forgetting_at, seed_curves
from cfsam.analysis.study import START, Study, arrays, loss_mean, measures, per_example, point_row, stage1_set
from cfsam.analysis.verdicts import Verdict, combine, front_setting, outcome, same_lr
from cfsam.core.errors import UsageError
from cfsam.pipeline import runs, specs
from cfsam.pipeline.cache import load_results
from cfsam.pipeline.presets import load_preset

REFERENCES = {"own start": "forgetting against the run's own stage-1 model",
              "base": "forgetting against the common base model"}


def _label(rho: float | None) -> str:
    return "adamw" if rho is None else f"adamw from sam {rho:g}"


def start_names(preset: str) -> dict[str, float | None]:
    """The stage-1 models compared, by experiment name: AdamW's (rho None) and each SAM start's radius."""
    p = load_preset(preset)
    return {START: None, **{f"{START}-sam-rho{r:g}": r for r in (p.get("starts") or {}).get("sam_rho", [])}}


def study(preset: str, reference: str = "own start") -> Study:
    """The AdamW stage-2 points on the headline set from every start present (family ``_label``), with a
    ``start`` column (learning's reference) and a ``reference`` column (forgetting's: ``REFERENCES``)."""
    if reference not in REFERENCES:
        raise UsageError(f"unknown reference {reference!r}; allowed: {', '.join(REFERENCES)}")
    p, exps = load_preset(preset), specs.expand(preset)
    if "starts" not in p:
        return Study(preset)
    ds = p["frontier"]["datasets"][0]
    starts = start_names(preset)
    names = [n for n, e in exps.items() if e.get("group") in ("frontier", "starts") and n.startswith(f"{ds}-")]
    picked = []
    for n in names:
        r = point_row(n, exps[n]["run"])
        if r["family"] != "adamw":
            continue
        start = runs.parse(exps[n]["run"]).parents()  # the stage-1 spec it continues from
        rho = start[0].get("rho") if start and start[0].get("optimizer") == "sam" else None
        if rho is None and exps[n].get("group") != "frontier":
            continue
        picked.append({**r, "family": _label(rho), "start": "start" if rho is None else f"{START}-sam-rho{rho:g}"})
    entries = {n: e for n, e in load_results(preset, [*starts, "base", *[r["name"] for r in picked]]).items()
               if e["status"] == "ok"}
    if START not in entries:
        return Study(preset)
    entries["start"] = entries.pop(START)
    rows = [r for r in picked if r["name"] in entries and r["start"] in entries]
    if reference == "base":
        if "base" not in entries:
            return Study(preset)
        rows = [{**r, "reference": "base"} for r in rows]
    for e in entries.values():
        arrays(e)
    return Study(preset, entries, pd.DataFrame(rows), {ds: {r["family"] for r in rows}})


def _flatness_of(starts) -> dict[str, str]:
    """Each start's flatness entry: AdamW's own landscape run (``frontier-stage1-flatness``), a SAM start's own."""
    return {START: f"{START}-flatness", **{n: n for n in starts if n != START}}


def starts_table(preset: str, *, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """Each start: how much it learned Alpaca (the fall of its held-out stage-1 loss from the base model, with a
    bootstrap standard error), that less AdamW's (paired over the same held-out examples, with a 95 % interval),
    whether it is at least AdamW's stage 1 (the calibration rule), and its flatness by every measure of
    ``flatness.FLATNESS`` (on examples disjoint from the held-out ones)."""
    if "starts" not in load_preset(preset):
        return pd.DataFrame()
    starts = start_names(preset)
    flat_of = _flatness_of(starts)
    entries = {n: e for n, e in load_results(preset, ["base", *starts, *flat_of.values()]).items()
               if e["status"] == "ok"}
    if "base" not in entries or START not in entries:
        return pd.DataFrame()
    s1 = stage1_set(entries[START])
    pe_b = np.asarray(per_example(entries["base"], s1), float)
    pe = {n: np.asarray(per_example(entries[n], s1), float) for n in starts if n in entries}
    idx = np.arange(len(pe_b))
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(pe_b), len(pe_b)) for _ in range(n_boot)]  # the same draws for every start
    learned = {n: np.array([loss_mean(pe_b, d) - loss_mean(p, d) for d in draws]) for n, p in pe.items()}
    rows = []
    for name, p in pe.items():
        rho = starts[name]
        diff = learned[name] - learned[START]
        row = {"start": name, "optimizer": "adamw" if rho is None else "sam", "rho": rho,
               "learned Alpaca": loss_mean(pe_b, idx) - loss_mean(p, idx), "se": float(np.std(learned[name], ddof=1)),
               "Δ learned vs AdamW": loss_mean(pe[START], idx) - loss_mean(p, idx),
               "Δ low": float(np.percentile(diff, 2.5)), "Δ high": float(np.percentile(diff, 97.5))}
        fe = entries.get(flat_of[name])
        row.update({m: flatness.value(fe, m) if fe else np.nan for m in flatness.FLATNESS})
        row["entries"] = " ".join(dict.fromkeys(["base", name] + ([flat_of[name]] if fe else [])))
        rows.append(row)
    out = pd.DataFrame(rows).set_index("start")
    out.insert(3, "learned as much as AdamW's", out["learned Alpaca"] >= out.loc[START, "learned Alpaca"])
    return out


def calibration_sentence(t: pd.DataFrame) -> str:
    """Whether each SAM start learned Alpaca as much as AdamW's stage 1 (the calibration rule), with the paired
    difference and its interval, and what stands in for the rule where it fails."""
    if t.empty or (t["optimizer"] == "sam").sum() == 0:
        return ""
    said, short = [], False
    for name, r in t[t["optimizer"] == "sam"].iterrows():
        within = r["Δ low"] <= 0 <= r["Δ high"]
        short |= not r["learned as much as AdamW's"]
        said.append(f"SAM {r.rho:g} learned {r['learned Alpaca']:.3f} nats ({r['Δ learned vs AdamW']:+.3f} "
                    f"[{r['Δ low']:+.3f}, {r['Δ high']:+.3f}] against AdamW's start, paired, "
                    f"{'within' if within else 'beyond'} the noise of the held-out examples)")
    head = f"AdamW's stage 1 learned Alpaca {t.loc[START, 'learned Alpaca']:.3f} nats; " + "; ".join(said) + "."
    if not short:
        return head + " Every SAM start meets the calibration rule."
    return (head + " By its point estimate, a start that falls short misses the calibration rule (at least as much "
            "as AdamW's); that is why forgetting is also read against the common base model, where a start that "
            "learned Alpaca less starts higher and cannot pass for one that forgets less.")


def start_forgetting(preset: str, *, share: float = 0.5) -> pd.DataFrame:
    """Each start's forgetting at one learning level, per reference of ``REFERENCES``: ``share`` of the learning
    every start's front reaches on every seed they all ran, read on each seed's front (from the settings every
    seed ran, as ``fronts.compare``) and averaged over those seeds."""
    rows = []
    for reference in REFERENCES:
        st = study(preset, reference)
        if st.empty:
            continue
        pts = measures(st)
        pts = pts[pts["dataset"] == st.sets[0]]
        seeds = sorted(set.intersection(*(set(g) for _, g in pts.groupby("family")["seed"])))
        pts = every_seed(pts[pts["seed"].isin(seeds)], seeds)
        if pts["family"].nunique() < 2:
            continue
        per = {fam: seed_curves(pts, fam) for fam in sorted(set(pts["family"]))}
        level = share * min(c[s][0].max() for c in per.values() for s in seeds)
        for fam, c in per.items():
            g = pts[pts["family"] == fam]
            rows.append({"start": START if g["start"].iloc[0] == "start" else g["start"].iloc[0],
                         "forgetting against": reference, "learning level": level,
                         "forgetting": float(np.mean([forgetting_at(c[s], level) for s in seeds])),
                         "seeds": len(seeds), "entries": " ".join(g["name"])})
    return pd.DataFrame(rows)


def correlation(preset: str, forgetting: pd.DataFrame | None = None, *, n_boot: int = 2000) -> pd.DataFrame:
    """Spearman's rho of each start's flatness (``starts_table``'s measures) with its forgetting at one learning
    level (``start_forgetting``), per reference: the starts are independent stage-1 runs, so these are the only
    runs that can be correlated here, and they are few (the ``runs`` column)."""
    f = start_forgetting(preset) if forgetting is None else forgetting
    if f.empty:
        return pd.DataFrame()
    flat_of = _flatness_of(start_names(preset))
    flat = {n: e for n, e in load_results(preset, [flat_of[n] for n in set(f["start"])]).items()
            if e["status"] == "ok"}
    out = []
    for reference, g in f.groupby("forgetting against", sort=False):
        c = flatness.correlations(flat, pd.Series({flat_of[r.start]: r.forgetting for r in g.itertuples()}),
                                  n_boot=n_boot)
        if not c.empty:
            c["entries"] = c["entries"] + " " + " ".join(g["entries"])
            out.append(c.assign(**{"forgetting against": reference, "learning level": g["learning level"].iloc[0]}))
    return pd.concat(out) if out else pd.DataFrame()


def correlation_sentence(c: pd.DataFrame) -> str:
    """What the correlation over the starts can say, with the least p-value so few starts allow."""
    if c.empty:
        return "Too few starts are computed for a correlation of their flatness with forgetting (three at least)."
    from cfsam.analysis.stats import permutation_spearman

    n = int(c["runs"].max())
    floor = permutation_spearman(np.arange(n), np.arange(n))[1]  # the p of a perfect ranking of n starts
    said = []
    for reference, g in c.groupby("forgetting against", sort=False):
        said.append(f"{REFERENCES[reference]}, " + ", ".join(f"{m} {r['Spearman rho']:+.2f}" for m, r in g.iterrows()))
    ways = c["the paper's way"].mean()
    return (f"Across the {n} starts, Spearman's rho of a start's flatness with its forgetting at "
            f"{c['learning level'].iloc[0]:.3f} nats of learning: " + "; ".join(said) + f" ({ways:.0%} of them "
            f"rank the paper's way, sharper forgets more). With {n} starts no correlation can reach p < {floor:.2f} "
            f"(the exact permutation p of a perfect ranking): the ranks show a direction, not evidence.")


def verdicts(preset: str, *, level: float = 0.5, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """Each SAM start against the AdamW start, for each reference of forgetting: Δ forgetting (SAM start - AdamW
    start) at matched learning (``level`` of the common reach) and at the same lr (the lr of the SAM start's
    front setting there), with 95 % intervals, each view's verdict ("reproduced": the flatter start forgets
    less) and both views' together."""
    rows = []
    for reference in REFERENCES:
        st = study(preset, reference)
        if st.empty:
            continue
        ds = st.sets[0]
        for fam in sorted(set(st.table["family"]) - {"adamw"}):
            m = compare(st, ds, "adamw", fam, levels=(level,), n_boot=n_boot, seed=seed)
            if m.empty:
                continue
            m = m.iloc[0]
            level_here = m["learning level"] if m["learning level"] == m["learning level"] else 0.0
            pick = front_setting(measures(st), ds, fam, level_here)  # the SAM start's lr at that level
            same = same_lr(st, ds, "adamw", fam, pick[0], pick[1], level=0.0, n_boot=n_boot, seed=seed) if pick else {}
            v_match, v_same = outcome(m["effect"], "less"), outcome(same.get("effect"), "less")
            rows.append({"start": "SAM rho " + fam.removeprefix("adamw from sam "), "forgetting against": reference,
                         "verdict": combine(v_match, v_same), "learning level": m["learning level"],
                         "Δ forgetting": m["Δ forgetting"], "low": m["low"], "high": m["high"],
                         "matched learning": v_match, "lr": same.get("lr"), "same-lr Δ": same.get("Δ forgetting"),
                         "same-lr low": same.get("low"), "same-lr high": same.get("high"),
                         "same-lr Δ learning": same.get("Δ learning"), "same lr": v_same, "seeds": m["seeds"],
                         "entries": " ".join(dict.fromkeys(m["entries"].split() + (same.get("entries") or "").split()))})
    return pd.DataFrame(rows)


def sentence(table: pd.DataFrame, starts: pd.DataFrame) -> str:
    """What the starts show: whether each SAM start is flatter and learned Alpaca as much, and its verdict."""
    if table.empty:
        return ("No stage-2 run from a SAM start is computed here yet (the cpu preset plans them: "
                "`cfsam run-missing --preset cpu --notebooks flatter_start`).")
    said = []
    for _, r in table.iterrows():
        text = (f"the {r.start} start against AdamW's, forgetting against {r['forgetting against']}: "
                f"**{r.verdict}**; at matched learning ({r['learning level']:.3f} nats) Δ forgetting "
                f"{r['Δ forgetting']:+.3f} [{r.low:+.3f}, {r.high:+.3f}], {r['matched learning']}")
        if r["same-lr Δ"] == r["same-lr Δ"] and r["same-lr Δ"] is not None:
            text += (f"; at the same lr ({r.lr:g}) {r['same-lr Δ']:+.3f} [{r['same-lr low']:+.3f}, "
                     f"{r['same-lr high']:+.3f}], {r['same lr']}")
        said.append(text + f" ({r.seeds} seed{'s' if r.seeds != 1 else ''})")
    flat = ""
    if not starts.empty and "SC" in starts and START in starts.index:
        sam = starts[starts["optimizer"] == "sam"]
        flatter = [f"SAM {r.rho:g} {'is' if r.SC < starts.loc[START, 'SC'] else 'is not'} flatter by SC "
                   f"({r.SC:.3g} against {starts.loc[START, 'SC']:.3g})" for _, r in sam.iterrows() if r.SC == r.SC]
        if flatter:
            flat = " As starts: " + "; ".join(flatter) + "."
    return "Does a flatter start forget less? " + "; ".join(said) + "." + flat


def headline(table: pd.DataFrame, preset: str) -> str:
    """The book's first page: the flatter-start verdict per start and reference, each view's Δ with its interval."""
    if table.empty:
        how = (f"`cfsam run-missing --preset {preset} --notebooks flatter_start`" if "starts" in load_preset(preset)
               else f"the {preset} preset does not plan it (the cpu preset does)")
        return f"**Beyond the paper, does a flatter start forget less?** Not computed yet: {how}."
    said = []
    for _, r in table.iterrows():
        same = (f"; same lr {r['same-lr Δ']:+.3f} [{r['same-lr low']:+.3f}, {r['same-lr high']:+.3f}]"
                if r["same-lr Δ"] == r["same-lr Δ"] and r["same-lr Δ"] is not None else "")
        said.append(f"the {r.start} start, forgetting against {r['forgetting against']}: **{r.verdict}** (matched "
                    f"learning {r['Δ forgetting']:+.3f} [{r.low:+.3f}, {r.high:+.3f}]{same}; {r.seeds} seeds)")
    return ("**Beyond the paper, does a flatter start forget less?** Stage 1 trained with SAM, then the same AdamW "
            "stage 2, against AdamW's stage 1 (Δ forgetting, SAM start − AdamW start): " + "; ".join(said) +
            ". The chapter *Beyond the paper: does a flatter start forget less?* has the starts, their flatness and both views.")


def relation(table: pd.DataFrame) -> str:
    """How the verdicts bear on Watts et al.'s finding (a SAM-flattened start forgets less after fine-tuning)
    and on the paper's thesis that forgetting goes with a sharper landscape."""
    if table.empty:
        return ""
    got, n = list(table["verdict"]), len(table)
    less, more = got.count(Verdict.REPRODUCED), got.count(Verdict.OPPOSITE)
    if less == n:
        return ("A flatter start forgot less in every comparison here, as Watts et al. find for SAM in pre- and "
                "mid-training, now at the stage the paper studies; it supports the paper's reading that a flatter "
                "model forgets less, causally rather than by correlation.")
    if more and not less:
        return ("A flatter start forgot more here: unlike Watts et al.'s finding for SAM in pre- and mid-training, "
                "and against the paper's reading that a flatter model forgets less.")
    if less and more:
        return ("The comparisons do not agree on a direction (see the table): at this size and with these seeds they "
                "neither confirm nor refute Watts et al.'s finding at the instruction-tuning stage.")
    if less:
        base = table[table["forgetting against"] == "base"]
        caveat = (" Against the common base model, the reading that a start which learned Alpaca less cannot game, "
                  "no comparison is decisive." if not base.empty and (base["verdict"] != Verdict.REPRODUCED).all() else "")
        most = table.loc[table["verdict"] == Verdict.REPRODUCED, ["Δ forgetting", "same-lr Δ"]].abs().max().max()
        return (f"A flatter start forgot less in {less} of {n} comparisons and more in none; the others are not "
                f"decisive.{caveat} This leans the way of Watts et al.'s finding at the instruction-tuning stage, by "
                f"{most:.3f} nats at most, but does not establish it here.")
    return ("No comparison is decisive: at this size and with these seeds the starts neither confirm nor refute "
            "Watts et al.'s finding at the instruction-tuning stage.")
