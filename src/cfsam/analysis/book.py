"""What every chapter does first, in one call: point at the results, select its experiments, say what they are.
And what it does last: one or two sentences computed from the chapter's numbers (``say`` and the ``*_sentence``
helpers), which name what is missing instead of failing when the cache lacks runs."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from cfsam.analysis import calibration, claims, cost, frontier, fronts, plots, report
from cfsam.analysis.fronts import Effect
from cfsam.analysis.study import Study
from cfsam.analysis.verdicts import Verdict, claim_verdicts
from cfsam.pipeline import chapters, specs
from cfsam.pipeline.cache import load_results


def open_chapter(name: str, preset: str, results_dir: str | None = None, *, missing: bool = False) -> list[str]:
    """The experiment names chapter ``name`` reads (its notebook's ``cfsam`` metadata), after pointing the
    cache at ``results_dir`` when given; shows the preset's note (and, with ``missing``, what is missing, stale or
    damaged, with the command that computes it)."""
    if results_dir:
        os.environ["CFSAM_RESULTS"] = str(results_dir)
    names = chapters.chapter_experiments(name, list(specs.expand(preset)))
    from IPython.display import Markdown, display

    display(Markdown(report.preset_note(preset)))
    if missing and names:
        display(Markdown(report.missing_note(report.frame(preset, names), preset)))
    return names


def say(*sentences: str) -> None:
    """A chapter's closing paragraph: what our run shows (empty sentences are left out)."""
    from IPython.display import Markdown, display

    display(Markdown("**What our run shows.** " + " ".join(s for s in sentences if s)))


def _lacking(preset: str, names: list[str]) -> list[str]:
    """Those of ``names`` that are experiments of the preset without a current result in the cache."""
    known = sorted(set(names) & set(specs.expand(preset)))
    return [n for n, e in load_results(preset, known).items() if e["status"] != "ok"] if known else []


def _listed(names: list[str], most: int = 6) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def claims_sentence(preset: str, where: str) -> str:
    """The verdicts, on our runs, of the paper's claims that cite ``where`` (e.g. 'Table 2(a)'), and the runs
    that the cache still lacks for them."""
    cited = [c for c in claims.registry() if where in [w.strip() for w in c["where"].split(",")]]
    if not cited:
        return ""
    try:
        verdicts = claims.check(preset, [c["id"] for c in cited])
    except ValueError:  # no task scored in every run
        verdicts = pd.DataFrame()
    avg = claims.MEASURES["score"][0]  # 'Δ AVG (points)'
    verdict_col = claims.verdict_column(avg)
    parts, runs = [], []
    for c in cited:
        pairs = claims.pairs_of(c, preset)
        runs += [n for pair in pairs for n in pair]
        row = verdicts.loc[c["id"]] if c["id"] in verdicts.index else None
        if row is None or row[verdict_col] == "not run":
            parts.append(f"*{c['id']}* not checked" + ("" if pairs else " (this preset has no such runs)"))
            continue
        h = claims.HELDOUT
        h_ci, h_verdict = row[f"{h} 95% CI"], row[claims.verdict_column(h)]
        way = row["held-out stage-1 loss: pairs the paper's way"]
        loss = (f"held-out Alpaca loss Δ {row[h]:+.3f} nats, 95 % CI {h_ci}, {h_verdict}" if h_ci != "–" else
                f"held-out Alpaca loss the paper's way in {way} pairs")
        # the runs by name, or by their pattern where one pattern expands to several pairs (pooled)
        named = c["pairs"] if len(c["pairs"]) == 1 and len(pairs) > 1 else pairs
        own = _learned_clause(row, named, pooled=row["pairs computed"] > 1)
        kept_more = "reproduced" in (row[verdict_col], h_verdict)
        caveat = (", so it may keep more only because it learned less: the frontier's matched-learning verdict is "
                  "the one to read" if row["confounded by learning"] and kept_more else "")
        per = "" if row["per pair"] == "–" else f"; at every size, as the paper claims it: {row['per pair']}"
        parts.append(f"*{c['id']}* {row[verdict_col]} (Δ AVG {row[avg]:+.2f} points, 95 % CI {row[avg + ' 95% CI']}; "
                     f"{loss}{own}{per}){caveat}")
    out = f"The paper's claims on {where}, on our runs: " + "; ".join(parts) + "."
    lacking = _lacking(preset, runs)
    return out + (f" No current result yet for {_listed(lacking)}: compute them with "
                  f"`cfsam run-missing --preset {preset}`." if lacking else "")


def _learned_clause(row: pd.Series, named: list, *, pooled: bool) -> str:
    """'; `b` learned less of its own set than `a`, held-out loss Δ … nats, 95 % CI […]' from a row of
    ``claims.check``, the runs ``named`` (a, b) pairs or their pattern, ``pooled`` over several pairs; '' where
    the learning has no interval."""
    how = {"b learned less": "less", "b learned more": "more", "alike": "as much"}.get(row["learning"])
    if how is None:
        return ""
    a, b = (" and ".join(dict.fromkeys(f"`{p[i]}`" for p in named)) for i in (0, 1))
    whose = "its own set" if len(named) == 1 else "their own sets"
    return (f"; {b} learned {how} of {whose} than {a}{' (pooled over the pairs)' if pooled else ''}, held-out loss Δ {row[claims.LEARNED]:+.3f} nats, "
            f"95 % CI {row[claims.LEARNED + ' 95% CI']}")


def delta_sentence(table: pd.DataFrame) -> str:
    """Whether our Delta has the paper's sign, row by row, in a ``report.compare`` table; and why rows lack ours."""
    if ("Delta", "ours") not in table:
        return ""
    rows = table[table[("Delta", "paper")].notna()]
    have = rows[rows[("Delta", "ours")].notna()]
    wrong = have.index[np.sign(have[("Delta", "ours")]) != np.sign(have[("Delta", "paper")])]
    out = f"Our Delta has the paper's sign in {len(have) - len(wrong)} of {len(have)} rows" if len(have) else (
        "No row has our Delta yet")
    out += f" (not in {', '.join(wrong)})" if len(wrong) else ""
    without = rows[rows[("Delta", "ours")].isna()]
    reasons = pd.Series("unscored here (its tasks, or its reference row)", index=without.index)
    reasons[without[("", "status")] != "ok"] = "without a current result"
    reasons[without[("", "experiment")].isna()] = "not run in this preset"  # no run of the preset matches the row
    for reason, labels in reasons.groupby(reasons, sort=False):
        out += f"; {reason}: {', '.join(labels.index)}"
    return out + "."


def rho_sentence(lf: pd.DataFrame) -> str:
    """The run that forgot least and the one that learned most, from ``report.learning_and_forgetting``."""
    learned = next((c for c in lf if c.startswith("learned")), None)
    forgot = next((c for c in lf if c.startswith("forgot")), None)
    if lf.empty or learned is None or lf[[learned, forgot]].dropna().empty:
        return "No run of this chapter has a current result in the cache yet (see the note above)."
    lf = lf[[learned, forgot]].dropna()
    least, most = lf[forgot].idxmin(), lf[learned].idxmin()
    out = (f"`{least}` forgot least (Alpaca held-out loss {lf.loc[least, forgot]:+.3f}; own held-out loss "
           f"{lf.loc[least, learned]:+.3f}) of {len(lf)} runs")
    if lf[learned].min() >= 0:
        return out + "; no run lowered its own held-out loss, so none learned its task in these few steps."
    if most == least:
        return out + ", and learned most."
    return out + f"; `{most}` learned most (own held-out loss {lf.loc[most, learned]:+.3f})."


def correlation_sentence(corr: pd.DataFrame) -> str:
    """Which flatness measures' rank correlation with forgetting has an interval that excludes zero."""
    corr = corr.dropna(subset=["Spearman rho"]) if not corr.empty else corr
    if corr.empty:
        return "No run with a measured landscape has a current result in the cache yet (see the note above)."
    clear = corr[(corr["low"] > 0) | (corr["high"] < 0)]
    n = int(corr["runs"].max())
    if clear.empty:
        return f"Over {n} runs no measure's interval excludes zero: no evidence either way."
    listed = ", ".join(f"{m} {r:+.2f}" for m, r in clear["Spearman rho"].items())
    return (f"Over {n} runs, the intervals that exclude zero: {listed} (positive: the sharper run forgot more, "
            f"as the paper reads its Table 1; negative: the opposite); the other {len(corr) - len(clear)} cover zero.")


def cost_sentence(spent: pd.DataFrame) -> str:
    """SAM's seconds per step against AdamW's (medians over the training runs of ``cost.cost``)."""
    per = spent.dropna(subset=["s_per_step"]).groupby("optimizer")["s_per_step"].median() if not spent.empty else {}
    if "sam" not in per or "adamw" not in per:
        return "This needs current results of both SAM and AdamW runs; the cache lacks them (see the note above)."
    return (f"A SAM step took {per['sam']:.1f} s against AdamW's {per['adamw']:.1f} s (medians): "
            f"×{per['sam'] / per['adamw']:.1f}, where two passes per step predict ×2.")


def verdicts_sentence(verdicts: pd.DataFrame) -> str:
    """The claims reproduced, and those found opposite, by any measure of ``claims.check``."""
    cols = [c for c in verdicts if c.startswith("verdict")]
    named = {v: [cid for cid, row in verdicts.iterrows() if v in set(row[cols])] for v in ("reproduced", "opposite")}
    confounded = [cid for cid in named["reproduced"] if bool(verdicts.loc[cid].get("confounded by learning", False))]
    return (f"Reproduced by any measure: {', '.join(named['reproduced']) or 'none'}"
            + (f" (of which {', '.join(confounded)} only with the run said to keep more learning clearly less of "
               "its set: see the frontier chapter)" if confounded else "")
            + f"; opposite: {', '.join(named['opposite']) or 'none'}; the other claims are inconclusive or not run here.")


def shortfalls(verdicts: pd.DataFrame, never: pd.DataFrame) -> str:
    """What does not reproduce, as a Markdown list: every matched-learning comparison of ``fronts.compare_all``
    that does not show less forgetting, and every run of ``frontier.never_learned``."""
    def at(share):  # NaN: no common learning, so no level
        return f" at {share:.0%} of the common reach" if share == share else ""

    lines = [f"- {r.dataset}, {r.comparison}: {r.verdict}{at(r['share of common reach'])}"
             for _, r in verdicts.iterrows() if r.effect is not Effect.LESS]
    lines += [f"- {r.family} at {r.setting:g} (seed {r.seed}) never learned {r.dataset}: its own held-out loss rose "
              f"by up to {r['own loss rose by up to']:.3f} nats, and it forgot {r['forgetting at the end']:+.3f} nats "
              f"of Alpaca by its end" for _, r in never.iterrows()]
    return "\n".join(lines) if lines else "Nothing yet: every comparison made so far shows less forgetting."


def _claim_sentence(r) -> str:
    """One claim on one set, both views: the verdict, then each view's Δ forgetting with its interval."""
    seeds = f"{r.seeds} seed{'s' if r.seeds != 1 else ''}"
    if r.verdict is Verdict.NOT_COMPARABLE and r.reason:
        return f"*{r.claim}* on {r.dataset}: no verdict yet, since {r.reason}"
    text = f"*{r.claim}* on {r.dataset}: **{r.verdict}**"
    if r["learning level"] == r["learning level"]:
        text += (f"; at matched learning ({r['learning level']:.3f} nats) Δ forgetting {r['Δ forgetting']:+.3f} "
                 f"[{r.low:+.3f}, {r.high:+.3f}] nats, {r['matched learning']}")
    if r["same-lr Δ"] == r["same-lr Δ"] and r["same-lr Δ"] is not None:
        setting = f", setting {r['b setting']:g}" if r.claim != "forgetting" else ""
        text += (f"; at the same lr ({r.lr:g}{setting}) {r['same-lr Δ']:+.3f} [{r['same-lr low']:+.3f}, "
                 f"{r['same-lr high']:+.3f}], {r['same lr']}, learning {r['same-lr Δ learning']:+.3f}")
    text += f" ({seeds})"
    if r.reason:
        text += f"; {r.reason}"
    return text


def frontier_claims_sentence(claim_verdicts: pd.DataFrame) -> str:
    """Each claim's verdict on the frontier (``verdicts.claim_verdicts``): both views, intervals and seeds."""
    said = [_claim_sentence(r).rstrip(".") for _, r in claim_verdicts.iterrows()]
    return ("The paper's claims on the frontier: " + "; ".join(said) + ".") if said else (
        "No frontier comparison yet.")


def findings(claim_verdicts: pd.DataFrame) -> str:
    """The book's first page: one sentence per claim and set, as a Markdown list."""
    if claim_verdicts.empty:
        return "No frontier comparison is computed yet."
    return "\n".join(f"- {_claim_sentence(r).rstrip('.')}." for _, r in claim_verdicts.iterrows())


def tables_findings(preset: str) -> str:
    """The first page's line on the paper's own tables: each method at its one fixed recipe, so the verdicts of
    ``claims.check`` (``verdicts_sentence``), with those marked confounded by learning."""
    from cfsam.pipeline.presets import load_preset

    try:
        table = claims.check(preset)
    except ValueError:  # no task scored in every run
        return ""
    p = load_preset(preset)
    e, sam = p["stage2"]["epochs"], p["sam"]
    return (f"**On the paper's own tables**, where each method runs at one fixed recipe (AdamW for {e} "
            f"epoch{'s' if e != 1 else ''}, SAM at rho {sam['rho']:g} for {sam.get('epochs', e)}; the results chapter "
            "has each comparison): " + verdicts_sentence(table))


def other_findings(preset: str) -> str:
    """The first page's verdicts on another preset's model (``findings``), under a line naming that model, so a
    reader who stops there also knows whether the answer holds beyond one model."""
    from cfsam.pipeline.presets import load_preset

    p = load_preset(preset)  # plain text: a notebook's Markdown output is CommonMark, where {doc} stays literal
    return (f"**On a second model**, `{p['model']}` (the `{preset}` preset: {p['description']}; its own learning "
            f"rates, chosen as the frontier chapter's second-model section shows):\n\n" + findings(claim_verdicts(preset)))


def robustness_sentence(robustness: pd.DataFrame) -> str:
    """Whether ``fronts.robustness`` finds a verdict that changes with the definition of forgetting."""
    if robustness.empty:
        return ""
    flips = robustness[~robustness["same verdict as the default"]]
    if flips.empty:
        return ("SAM's verdict is the same under every definition of forgetting we checked, with the first seed's "
                "extra settings too, and under the conservative step front.")
    return ("SAM's verdict changes with the definition of forgetting: " + "; ".join(
        f"on {r.dataset}, by {r['forgetting measure']} with fronts from {r['frontier from']}, {r.verdict}"
        for _, r in flips.iterrows()) + ".")


def flatness_sentence(table: pd.DataFrame, alpha: float = 0.05) -> str:
    """Which way each flatness measure of ``frontier.flatness_vs_forgetting`` ranks forgetting, where its
    permutation p-value is below ``alpha``, and which are not significant."""
    if table.empty:
        return ""
    sig, rest = table[table["p"] < alpha], table[table["p"] >= alpha]
    parts = [f"over {int(table['runs'].max())} end points, "]
    parts += [", ".join(f"{m} ranks {r.ranks} (Spearman {r['Spearman rho']:+.2f}, p {r.p:.2g})"
                        for m, r in sig.iterrows()) or f"no flatness measure has p < {alpha:g}"]
    if not rest.empty and not sig.empty:
        parts.append(f"; not significant: {', '.join(rest.index)}")
    return "Flatness against forgetting, " + "".join(parts) + "."


def flatness_by_model_sentence(table: pd.DataFrame, alpha: float = 0.05) -> str:
    """``flatness_sentence`` for each model of ``frontier.flatness_by_model`` and for the pooled rows."""
    if table.empty:
        return ""
    return " ".join(f"{model}: " + flatness_sentence(sub.droplevel(0), alpha)
                    for model, sub in table.groupby(level=0, sort=False))


def recipes_sentence(preset: str) -> str:
    """How each model of a size comparison trains (its stage-1 and stage-2 lr and precision, read from its
    runs' specs), and which preset's recipe that is (``size_recipes``): a block is only comparable within itself."""
    from cfsam.pipeline.presets import load_preset

    p, exps = load_preset(preset), specs.expand(preset)
    parts = []
    for model in dict.fromkeys([p["model"], *p["sizes"]]):
        prefix = "" if model == p["model"] else f"{model}/"
        s1, s2 = exps[prefix + "stage1"]["run"], exps[f"{prefix}s2-{specs.PAPER_SET}-adamw"]["run"]
        whose = p.get("size_recipes", {}).get(model)
        parts.append(f"{model} with {'the `' + whose + '` preset' if whose else 'this preset'}'s recipe (stage 1 at lr "
                     f"{s1['lr']:g}, stage 2 at {s2['lr']:g}, {specs.canonical_run(s2)['precision']})")
    if len(parts) < 2:
        return ""
    return "How each model trains: " + "; ".join(parts) + (
        ". A model tuned at another model's learning rates can start from a damaged stage 1, so each block compares "
        "SAM with AdamW within one model and one recipe." if p.get("size_recipes") else
        ": one recipe for every size, as the paper's.")


def other_study(preset: str, results_dir: str | None = None) -> None:
    """The frontier chapter's study on another preset (a larger one, a second model), compactly: what is missing, the learning check, the
    frontiers, end points, claims at matched learning, runs that never learned, SAM's gradients, robustness,
    flatness against forgetting and cost; then what its runs show."""
    from IPython.display import Markdown, display

    names = open_chapter("frontier", preset, results_dir, missing=True)
    study = Study.of(preset)
    cal = calibration.stage1(preset)
    if not cal.empty:  # how its start was chosen
        display(report.show(cal, 3, name=f"stage1-calibration-{preset}"), Markdown(calibration.sentence(cal)))
    display(report.show(frontier.learning_check(study), 3, name=f"learning-check-{preset}"))
    pts = frontier.points(study)
    if pts.empty:
        return
    plots.frontier(pts, fronts.curves(pts))
    cv = claim_verdicts(study)
    rob = fronts.robustness(study, n_boot=300)
    fvf = frontier.flatness_vs_forgetting(study)
    sg = frontier.sam_gradients(study)
    never = frontier.never_learned(pts)
    for table, name in [(frontier.end_points(pts), "end-points"), (cv.drop(columns=["paper"]), "frontier-claims"),
                        (never, "never-learned"), (sg, "sam-gradients"), (rob, "frontier-robustness"),
                        (fvf, "flatness-vs-forgetting"), (cost.cost(preset, names), "frontier-cost")]:
        if not table.empty:
            display(report.show(table, 1 if name == "frontier-cost" else 3, name=f"{name}-{preset}"))
    display(Markdown(f"**What the {preset} runs show.** " + " ".join(
        s for s in (frontier_claims_sentence(cv), robustness_sentence(rob), flatness_sentence(fvf),
                    frontier.sam_gradient_sentence(sg)) if s)))


def short_runs_sentence(table: pd.DataFrame) -> str:
    """Whether each short run lies on its method's front (``snapshots.short_runs``)."""
    if table.empty:
        return ""
    said = [f"{r['short run']} {'lies on' if r['on the same front'] else 'does not lie on'} its front "
            f"({r['above its front']:+.3f} nats above it [{r['above low']:+.3f}, {r['above high']:+.3f}]; against "
            f"the 2/4 snapshot Δ learning {r['Δ learning']:+.3f}, Δ forgetting {r['Δ forgetting']:+.3f})"
            for _, r in table.iterrows()]
    return "Short runs: " + "; ".join(said) + "."
