"""Frontiers: the Pareto front and interpolation by hand, and a matched-learning comparison on synthetic entries."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cfsam.analysis import book, cost, frontier, fronts, screen, study, verdicts
from cfsam.analysis import stats as exact
from cfsam.core.io import write_json_atomic
from cfsam.pipeline import cache, specs



def test_step_front_by_hand():
    """The conservative front: the least forgetting among the points that learned at least that much."""
    curve = fronts.pareto_curve([1.0, 2.0], [0.5, 1.0])
    assert fronts.forgetting_at(curve, 1.5, "step") == 1.0 and fronts.forgetting_at(curve, 1.5) == 0.75
    assert fronts.forgetting_at(curve, 0.5, "step") == 0.5 and fronts.forgetting_at(curve, 0.5) == 0.25
    assert fronts.forgetting_at(curve, 1.0, "step") == 0.5 and np.isnan(fronts.forgetting_at(curve, 2.5, "step"))


def test_verdicts_combine_views_and_read_the_papers_direction():
    V, E = verdicts.Verdict, fronts.Effect
    assert verdicts.outcome(E.LESS, "less") is V.REPRODUCED and verdicts.outcome(E.MORE, "less") is V.OPPOSITE
    assert verdicts.outcome(E.INCONCLUSIVE, "more") is V.INCONCLUSIVE
    assert verdicts.outcome(E.NO_COMMON, "less") is V.NOT_COMPARABLE and verdicts.outcome(None, "less") is V.NOT_COMPARABLE
    assert verdicts.combine(V.OPPOSITE, V.OPPOSITE) is V.OPPOSITE
    assert verdicts.combine(V.REPRODUCED, V.OPPOSITE) is V.DEPENDS
    assert verdicts.combine(V.REPRODUCED, V.INCONCLUSIVE) is V.DEPENDS  # one view decisive, the other not
    assert verdicts.combine(V.INCONCLUSIVE, V.NOT_COMPARABLE) is V.INCONCLUSIVE
    # a view that could not be read neither confirms nor contradicts a decisive one
    assert verdicts.combine(V.REPRODUCED, V.NOT_COMPARABLE) is V.NOT_COMPARABLE
    assert verdicts.combine(V.NOT_COMPARABLE, V.OPPOSITE) is V.NOT_COMPARABLE
    assert E.of(-0.2, -0.1) is E.LESS and E.of(0.1, 0.2) is E.MORE and E.of(-0.1, 0.1) is E.INCONCLUSIVE


def test_tuned_unlike_names_the_lrs_each_front_is_built_from():
    pts = pd.DataFrame({"family": ["adamw", "adamw", "sam", "sam", "sam"], "lr": [5e-5, 1e-4, 1e-4, 1e-4, 5e-5],
                        "setting": [5e-5, 1e-4, 0.05, 0.5, 0.05]})
    assert verdicts.tuned_unlike(pts, "adamw", "sam", 3) == ""  # the same lrs, whatever the settings
    got = verdicts.tuned_unlike(pts[pts["lr"] != 5e-5], "adamw", "sam", 3)
    assert got == ""  # both at 1e-4 alone
    got = verdicts.tuned_unlike(pts.iloc[:4], "adamw", "sam", 3)
    assert got.startswith("tuned unlike over its 3 seeds: adamw's front spans lr 5e-05, 0.0001, sam's lr 0.0001")
    assert "sam's lr none" in verdicts.tuned_unlike(pts.iloc[:2], "adamw", "sam", 2)


def test_a_claim_that_depends_on_the_view_and_a_set_that_fails_the_sizing_rule(tmp_path, monkeypatch):
    """Per k of 4 on MetaMathQA: AdamW 3e-4 learns 0.1 k and forgets 0.3 k, AdamW 1e-4 learns 0.1 k and
    forgets 0.05 k, SAM 0.5 (at 3e-4) learns 0.1 k and forgets 0.1 k. At matched learning L = 0.2 AdamW's
    front is its 1e-4 run: Δ = 0.2 - 0.1 = +0.1 (opposite); at the same lr (3e-4) SAM forgets 0.2 k less, mean
    -0.5 (reproduced): the verdict depends on the view. On ShareGPT the AdamW reference learns 0.05 nats: no
    verdict there."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("cpu")
    write_json_atomic(tmp_path / "cpu" / "frontier-stage1.json",
                      _entry(exps["frontier-stage1"], "frontier-stage1", own=2.0, s1=1.0))
    runs = [("metamathqa", "adamw-lr0.0003", 0.1, 0.3), ("metamathqa", "adamw-lr0.0001", 0.1, 0.05),
            ("metamathqa", "sam-rho0.5", 0.1, 0.1), ("sharegpt", "adamw-lr0.0003", 0.0125, 0.1),
            ("sharegpt", "sam-rho0.5", 0.0125, 0.05)]
    for ds, method, learn, slope in runs:
        for k in range(1, 5):
            name = f"{ds}-{method}-s1234-{k}of4"
            write_json_atomic(tmp_path / "cpu" / f"{name}.json",
                              _entry(exps[name], name, own=2.0 - learn * k, s1=1.0 + slope * k))
    cv = verdicts.claim_verdicts("cpu", n_boot=50).set_index(["claim", "dataset"])
    row = cv.loc[("sam-mitigates", "metamathqa")]
    assert row["Δ forgetting"] == pytest.approx(0.1) and row["matched learning"] is verdicts.Verdict.OPPOSITE
    assert row["same-lr Δ"] == pytest.approx(-0.5) and row["same lr"] is verdicts.Verdict.REPRODUCED
    assert (row["lr"], row["b setting"]) == (3.0e-4, 0.5)
    assert row["verdict"] is verdicts.Verdict.DEPENDS
    # AdamW's front had two lrs to be tuned over, SAM's one: the reason says so
    assert "tuned unlike over its 1 seeds: adamw's front spans lr 0.0001, 0.0003, sam's lr 0.0003" in row["reason"]
    share = cv.loc[("sam-mitigates", "sharegpt")]
    assert share["verdict"] is verdicts.Verdict.NOT_COMPARABLE and "learned 0.050" in share["reason"]
    # the same-lr table: SAM 0.5 against AdamW at 3e-4, point by point
    t = verdicts.same_lr_table("cpu", n_boot=20).set_index("dataset")
    assert t.loc["metamathqa", "Δ forgetting"] == pytest.approx(-0.5) and t.loc["metamathqa", "pairs"] == 4


def test_a_claim_with_one_view_missing_is_not_comparable_and_says_why(tmp_path, monkeypatch):
    """SAM ran only at lr 5e-5 and AdamW only at 3e-4: the matched view reads SAM forgetting less (0.05 k
    against 0.3 k per 0.1 k learned), but there is no AdamW run at 5e-5 to pair with, so the claim is not
    comparable, and the reason names the missing view and its command."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("cpu")
    write_json_atomic(tmp_path / "cpu" / "frontier-stage1.json",
                      _entry(exps["frontier-stage1"], "frontier-stage1", own=2.0, s1=1.0))
    for method, slope in (("adamw-lr0.0003", 0.3), ("sam-rho0.5-lr5e-05", 0.05)):
        for k in range(1, 5):
            name = f"metamathqa-{method}-s1234-{k}of4"
            write_json_atomic(tmp_path / "cpu" / f"{name}.json",
                              _entry(exps[name], name, own=2.0 - 0.1 * k, s1=1.0 + slope * k))
    row = verdicts.claim_verdicts("cpu", n_boot=50).set_index(["claim", "dataset"]).loc[("sam-mitigates", "metamathqa")]
    assert row["matched learning"] is verdicts.Verdict.REPRODUCED and row["Δ forgetting"] == pytest.approx(-0.5)
    assert row["same lr"] is verdicts.Verdict.NOT_COMPARABLE and row["lr"] == 5.0e-5
    assert row["verdict"] is verdicts.Verdict.NOT_COMPARABLE
    assert "same-lr view has no pairs: adamw has no run at lr 5e-05" in row["reason"]


def test_pareto_front_and_interpolation_by_hand():
    x, y = fronts.pareto_curve([1.0, 2.0, 1.5], [0.5, 1.0, 2.0])  # (1.5, 2.0) is dominated by (2, 1)
    assert x.tolist() == [0.0, 1.0, 2.0] and y.tolist() == [0.0, 0.5, 1.0]
    assert fronts.forgetting_at((x, y), 1.5) == pytest.approx(0.75)
    assert np.isnan(fronts.forgetting_at((x, y), 2.5))  # beyond the front's reach: no extrapolation
    # a point that learns more and forgets less than the stage-1 model: below it, its own forgetting
    x, y = fronts.pareto_curve([1.0, 0.5], [-0.2, 0.3])
    assert x.tolist() == [1.0] and fronts.forgetting_at((x, y), 0.5) == pytest.approx(-0.2)
    x, y = fronts.pareto_curve([0.4, 0.2], [0.0, 0.0])  # never forgets: the whole front is flat at 0
    assert fronts.forgetting_at((x, y), 0.1) == 0.0


def _entry(exp, name, own, s1, n=6, gold=None, acc=0.5):
    """Per-example losses: every example of a set has the same mean loss, 10 tokens; with ``gold``, eval items
    of copa whose gold log-prob among the choices is ``gold`` (synthetic, never a result)."""
    sets = exp["measure"]["heldout"]["datasets"]
    per = {sets[0]: s1, **{d: own for d in sets[1:]}}
    out = {"id": specs.experiment_id(exp), "name": name, "spec": exp, "provenance": {"data": cache.data_hashes(exp)},
           "heldout_loss": {d: {"loss": v, "n": n, "per_example": [[10 * v, 10]] * n} for d, v in per.items()}}
    if gold is not None:
        recs = [{"idx": i, "gold_choice_logprob": gold + 0.01 * (i % 3), "acc": acc} for i in (5, 1, 7, 3)]
        out["eval"] = {"tasks": {"copa": {"status": "ok", "primary": "acc", "records": recs}}}
    return out


def _with_stage1(tmp_path, monkeypatch, **losses):
    """The smoke preset's experiments, with a results cache in tmp_path holding its stage-1 model (own set's
    held-out loss 2.0, stage-1 set's 1.0 unless given)."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("smoke")
    write_json_atomic(tmp_path / "smoke" / "frontier-stage1.json",
                      _entry(exps["frontier-stage1"], "frontier-stage1", **{"own": 2.0, "s1": 1.0, **losses}))
    return exps


def test_sam_forgets_less_at_matched_learning_on_synthetic_points(tmp_path, monkeypatch):
    exps = _with_stage1(tmp_path, monkeypatch)
    for k in range(1, 5):  # AdamW: learns 0.1 k, forgets 0.2 k; SAM: learns 0.1 k, forgets 0.1 k
        for method, slope in (("adamw-lr0.001", 0.2), ("sam-rho2", 0.1)):
            name = f"open-platypus-{method}-s1234-{k}of4"
            write_json_atomic(tmp_path / "smoke" / f"{name}.json",
                              _entry(exps[name], name, own=2.0 - 0.1 * k, s1=1.0 + slope * k))
    pts = frontier.points("smoke")
    assert sorted(pts["family"].unique()) == ["adamw", "sam"]
    assert pts.set_index("name").loc["open-platypus-adamw-lr0.001-s1234-2of4", "forgetting"] == pytest.approx(0.4)
    table = fronts.compare("smoke", "open-platypus", n_boot=50)
    # reach 0.4; levels 0.1, 0.2, 0.3: F_adamw = 2L, F_sam = L, so delta = -L
    assert table["learning level"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert table["Δ forgetting"].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert (table["verdict"] == "sam: less forgetting").all() and (table["comparable draws"] == 1.0).all()
    # every family against AdamW on every set: only SAM has points here, so the same three rows
    pd.testing.assert_frame_equal(fronts.compare_all("smoke", n_boot=50), table)
    # the paper's claims at matched learning (claims.yaml's `frontier`): only those with both families present
    cv = verdicts.claim_verdicts("smoke", n_boot=50).set_index("claim")
    assert list(cv.index) == ["forgetting", "sam-mitigates", "sam-beats-wise-ft"]  # the preset plans Wise-FT too
    wise = cv.loc["sam-beats-wise-ft"]
    assert wise["verdict"] is verdicts.Verdict.NOT_COMPARABLE and "not computed yet" in wise["reason"]
    cv = cv.drop(index="sam-beats-wise-ft")
    assert cv.loc["forgetting", "Δ forgetting"] == pytest.approx(0.4)  # F_adamw(0.2) = 0.4 against nothing
    assert cv.loc["sam-mitigates", "Δ forgetting"] == pytest.approx(-0.2)
    # the same lr, point by point: SAM forgets 0.1 k less at each k (mean over k = 1..4: -0.25), learns as much;
    # AdamW against the stage-1 model forgets 0.2 k (mean 0.5)
    assert cv.loc["sam-mitigates", "same-lr Δ"] == pytest.approx(-0.25)
    assert cv.loc["sam-mitigates", "same-lr Δ learning"] == pytest.approx(0.0)
    assert cv.loc["forgetting", "same-lr Δ"] == pytest.approx(0.5)
    assert (cv["verdict"] == verdicts.Verdict.REPRODUCED).all() and (cv["step front"] == verdicts.Verdict.REPRODUCED).all()
    names = set(cv.loc["sam-mitigates", "entries"].split())  # every entry it read, by its file's name
    assert names == {f"open-platypus-{m}-s1234-{k}of4" for m in ("adamw-lr0.001", "sam-rho2") for k in range(1, 5)}
    # a chapter reads the cache once: given the study, nothing is loaded again, and the numbers are the same
    from cfsam.analysis import study as study_mod

    once = study.Study.of("smoke")
    with monkeypatch.context() as m:
        m.setattr(study_mod, "load_results", lambda *a, **k: pytest.fail("the cache was read again"))
        pd.testing.assert_frame_equal(fronts.compare(once, "open-platypus", n_boot=50), table)
        again = verdicts.claim_verdicts(once, n_boot=50).set_index("claim").drop(index="sam-beats-wise-ft")
        pd.testing.assert_frame_equal(again, cv)
    lc = frontier.learning_check("smoke", n_boot=20)  # no base model measured: the AdamW reference only
    assert lc["dataset"].tolist() == ["open-platypus"] and lc["learning"].iloc[0] == pytest.approx(0.4)
    assert lc["se"].iloc[0] == pytest.approx(0.0) and lc["clears the sizing rule"].all()  # identical examples


def test_a_verdict_is_checked_under_every_definition_of_forgetting(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("smoke")
    write_json_atomic(tmp_path / "smoke" / "frontier-stage1.json", _entry(exps["frontier-stage1"], "frontier-stage1",
                                                                         own=2.0, s1=1.0, gold=-0.5))
    for k in range(1, 5):  # SAM forgets half as much by the held-out loss and the gold log-prob; accuracy never moves
        for method, slope in (("adamw-lr0.001", 0.2), ("sam-rho2", 0.1)):
            name = f"open-platypus-{method}-s1234-{k}of4"
            write_json_atomic(tmp_path / "smoke" / f"{name}.json",
                              _entry(exps[name], name, own=2.0 - 0.1 * k, s1=1.0 + slope * k, gold=-0.5 - slope * k))
    pts = frontier.points("smoke").set_index("name")
    assert pts.loc["open-platypus-adamw-lr0.001-s1234-2of4", "ability fall (gold log-prob)"] == pytest.approx(0.4)
    assert pts.loc["open-platypus-adamw-lr0.001-s1234-2of4", "ability fall (accuracy)"] == pytest.approx(0.0)
    full = fronts.robustness("smoke", "open-platypus", n_boot=30)
    assert full["forgetting measure"].tolist() == [*study.FORGETTING, "heldout", "heldout"]
    assert full["frontier from"].iloc[-2] == fronts.SETTINGS["all"]  # one seed: the same points
    assert full["front"].iloc[-1] == "step" and full["Δ forgetting"].iloc[-1] == pytest.approx(-0.2)  # on its points
    assert full["same verdict as the default"].iloc[-2:].all() and full["Δ forgetting"].iloc[-2] == pytest.approx(-0.2)
    table = full.iloc[:-2].set_index("forgetting measure")
    # level 0.2 (half of the common reach 0.4): F_adamw = 2L, F_sam = L by both losses and the gold log-prob
    for m in ("heldout", "heldout per example", "gold log-prob"):
        assert table.loc[m, "Δ forgetting"] == pytest.approx(-0.2), m
        assert table.loc[m, "verdict"] == "sam: less forgetting" and table.loc[m, "same verdict as the default"]
    assert table.loc["accuracy", "Δ forgetting"] == pytest.approx(0.0)
    assert table.loc["accuracy", "verdict"] == "sam: inconclusive"
    assert not table.loc["accuracy", "same verdict as the default"]  # the flip is flagged
    pd.testing.assert_frame_equal(fronts.robustness("smoke", n_boot=30), full)  # every set: the only one
    assert book.robustness_sentence(full).startswith("SAM's verdict changes with the definition of forgetting: "
                                                     "on open-platypus, by accuracy with fronts from only the settings "
                                                     "every seed ran, sam: inconclusive")
    assert "same under every" in book.robustness_sentence(full[full["same verdict as the default"]])
    with pytest.raises(ValueError, match="unknown forgetting measure 'perplexity'; allowed: heldout"):
        fronts.compare("smoke", "open-platypus", forgetting="perplexity")


def test_fronts_from_only_the_settings_every_seed_ran(tmp_path, monkeypatch):
    """The first seed also runs the sweep's extra points (AdamW at 5e-5 here): they improve its AdamW front
    only. Per k of 4: AdamW 3e-4 learns 0.1 k and forgets 0.2 k, AdamW 5e-5 learns 0.1 k and forgets 0.05 k,
    SAM 0.5 learns 0.1 k and forgets 0.1 k. At half the common reach 0.4 (L = 0.2): seed 1234's Δ is
    0.2 - 0.1 = +0.1 with every setting, seed 1235's is 0.2 - 0.4 = -0.2; with the settings both ran, -0.2 on both."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("cpu")
    write_json_atomic(tmp_path / "cpu" / "frontier-stage1.json",
                      _entry(exps["frontier-stage1"], "frontier-stage1", own=2.0, s1=1.0))
    runs = [("adamw-lr0.0003", 0.2, (1234, 1235)), ("adamw-lr5e-05", 0.05, (1234,)), ("sam-rho0.5", 0.1, (1234, 1235))]
    for method, slope, seeds in runs:
        for seed in seeds:
            for k in range(1, 5):
                name = f"metamathqa-{method}-s{seed}-{k}of4"
                write_json_atomic(tmp_path / "cpu" / f"{name}.json",
                                  _entry(exps[name], name, own=2.0 - 0.1 * k, s1=1.0 + slope * k))
    every = fronts.compare("cpu", "metamathqa", levels=(0.5,), n_boot=200, settings="all").iloc[0]
    assert every["Δ forgetting"] == pytest.approx((0.1 - 0.2) / 2) and every["seeds"] == 2
    assert every["low"] == pytest.approx(-0.2) and every["high"] == pytest.approx(0.1)  # seeds resampled
    common = fronts.compare("cpu", "metamathqa", levels=(0.5,), n_boot=200).iloc[0]  # the default
    assert common["Δ forgetting"] == pytest.approx(-0.2) and common["verdict"] == "sam: less forgetting"
    rob = fronts.robustness("cpu", "metamathqa", n_boot=200)
    last = rob.iloc[-2]
    assert last["frontier from"] == fronts.SETTINGS["all"] and not last["same verdict as the default"]
    with pytest.raises(ValueError, match="unknown settings 'some'; allowed: every seed, all"):
        fronts.compare("cpu", "metamathqa", settings="some")


def test_a_run_measured_in_part_gives_every_seed_only_the_points_all_have(tmp_path, monkeypatch):
    """Seed 1235's AdamW 5e-5 run has only its points 1 and 2 so far (slopes as above): the fronts take 5e-5 at
    those points on both seeds. At L = 0.3 (0.75 of the reach 0.4) AdamW's front is then the line from
    (0.2, 0.1) to 3e-4's (0.3, 0.6) on both seeds, Δ = 0.3 - 0.6 = -0.3; seed 1234's points 3 and 4 of 5e-5
    would have given it 0.15 there, and the mean Δ (0.15 - 0.3 on one seed) -0.075."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("cpu")
    write_json_atomic(tmp_path / "cpu" / "frontier-stage1.json",
                      _entry(exps["frontier-stage1"], "frontier-stage1", own=2.0, s1=1.0))
    runs = [("adamw-lr0.0003", 0.2, 1234, 4), ("adamw-lr0.0003", 0.2, 1235, 4), ("adamw-lr5e-05", 0.05, 1234, 4),
            ("adamw-lr5e-05", 0.05, 1235, 2), ("sam-rho0.5", 0.1, 1234, 4), ("sam-rho0.5", 0.1, 1235, 4)]
    for method, slope, seed, points in runs:
        for k in range(1, points + 1):
            name = f"metamathqa-{method}-s{seed}-{k}of4"
            write_json_atomic(tmp_path / "cpu" / f"{name}.json",
                              _entry(exps[name], name, own=2.0 - 0.1 * k, s1=1.0 + slope * k))
    got = fronts.compare("cpu", "metamathqa", levels=(0.75,), n_boot=50).iloc[0]
    assert got["Δ forgetting"] == pytest.approx(-0.3) and got["learning level"] == pytest.approx(0.3)
    assert "metamathqa-adamw-lr5e-05-s1234-3of4" not in got["entries"].split()


def test_sam_claims_stay_on_the_papers_sam_sets(tmp_path, monkeypatch):
    """Auto-Wiki is the paper's task-gap set, not one of its SAM sets: on it the frontier still compares SAM
    with AdamW (``verdicts``), but only the forgetting claim is checked there (``claim_verdicts``)."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("cpu")
    write_json_atomic(tmp_path / "cpu" / "frontier-stage1.json",
                      _entry(exps["frontier-stage1"], "frontier-stage1", own=2.0, s1=1.0))
    for ds in ("auto-wiki", "sharegpt"):
        for method, slope in (("adamw-lr0.0003", 0.2), ("sam-rho0.5", 0.1)):
            for k in range(1, 5):
                name = f"{ds}-{method}-s1234-{k}of4"
                write_json_atomic(tmp_path / "cpu" / f"{name}.json",
                                  _entry(exps[name], name, own=2.0 - 0.1 * k, s1=1.0 + slope * k))
    v = fronts.compare_all("cpu", n_boot=50)
    assert sorted(set(zip(v["dataset"], v["comparison"].str[:3]))) == [("auto-wiki", "sam"), ("sharegpt", "sam")]
    cv = verdicts.claim_verdicts("cpu", n_boot=50)
    assert sorted(zip(cv["dataset"], cv["claim"])) == [("auto-wiki", "forgetting"), ("sharegpt", "forgetting"),
                                                        ("sharegpt", "sam-mitigates")]


def test_cost_counts_a_runs_training_once_for_its_points(tmp_path, monkeypatch):
    from cfsam.analysis import report

    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("smoke")
    names = [f"open-platypus-adamw-lr0.001-s1234-{k}of4" for k in (1, 2)]
    for k, name in enumerate(names):
        e = _entry(exps[name], name, own=2.0, s1=1.0)
        e["train"] = {"run_id": "r1", "train_seconds": 100.0, "total_steps": 10}  # one run, two snapshots
        e["provenance"]["wall_s"] = 130.0 if k == 0 else 20.0
        # side by side: the second starts 30 s into the first (--workers), so the machine is busy 130 s
        e["provenance"]["start"] = "2026-11-30T00:00:00+00:00" if k == 0 else "2026-11-30T00:00:30+00:00"
        e["provenance"]["end"] = "2026-11-30T00:02:10+00:00" if k == 0 else "2026-11-30T00:00:50+00:00"
        write_json_atomic(tmp_path / "smoke" / f"{name}.json", e)
    empty = cost.cost("smoke", ["open-platypus-sam-rho2-s1234-1of4"])  # nothing computed: empty, with its columns
    assert empty.empty and empty.dropna(subset=["steps"]).empty
    c = cost.cost("smoke", names)
    assert c.loc[names[1], "train_s"] == 100.0  # each point says what its run took
    assert c.loc["total", "train_s"] == 100.0 and c.loc["total", "wall_s"] == 150.0  # the total trains once
    assert c.loc["total", "machine_s"] == 130.0 and c["machine_s"].drop("total").isna().all()
    assert cost._busy_seconds([(pd.Timestamp(0, unit="s"), pd.Timestamp(10, unit="s")),
                                 (pd.Timestamp(20, unit="s"), pd.Timestamp(25, unit="s"))]) == 15.0  # a gap is idle


def test_missing_cost_times_each_phase_and_trains_each_run_once(tmp_path, monkeypatch):
    """One current point: held-out losses on 2 sets in 6 s (3 s a set), eval in 2 s, 4 AdamW steps in 10 s.
    A fresh machine trains each missing run once, and each parent it starts from: 4 steps of 2.5 s for a frontier
    run or stage 1; the paper's Rehearsal run (2 epochs of 16 examples plus round(0.1 * 16 / 0.9) = 2 replayed, in
    batches of 4) 10 steps."""
    from cfsam.analysis import report

    exps = _with_stage1(tmp_path, monkeypatch)
    done = "open-platypus-adamw-lr0.001-s1234-1of4"
    e = _entry(exps[done], done, own=1.9, s1=1.1)
    e["measure_seconds"] = {"heldout": 6.0, "eval": 2.0}
    e["train"] = {"config": {"optimizer": "adamw"}, "total_steps": 4, "train_seconds": 10.0}
    write_json_atomic(tmp_path / "smoke" / f"{done}.json", e)
    names = [done, "open-platypus-adamw-lr0.001-s1234-2of4", "open-platypus-wiseft-a0.5-s1234",
             "s2-auto-wiki-adamw-e1", "rehearsal-open-platypus-adamw", "open-platypus-sam-rho2-s1234-1of4"]
    t = cost.missing_cost("smoke", names)
    assert done not in t.index and len(t) == 5
    assert t.loc[names[1], ["train_s", "measure_s"]].tolist() == [10.0, 8.0]  # its run is retrained, once
    assert t.loc[names[2], ["train_s", "wall_s"]].tolist() == [0.0, 8.0]  # merged from that run: trained already
    # another set's run, 4 steps, and stage 1 (4 steps), which every stage 2 starts from: the first needing it trains it
    assert t.loc[names[3], "train_s"] == 20.0
    assert t["train_s"].sum() == 10.0 + 20.0 + 25.0  # stage 1 once in all; SAM's steps untimed (NaN)
    assert t.loc[names[3], "like"] == "1 of 2 phases"  # held-out losses timed on other sets; the paper's eval not
    assert t.loc["rehearsal-open-platypus-adamw", "train_s"] == 25.0
    assert np.isnan(t.loc["rehearsal-open-platypus-adamw", "measure_s"])  # the paper's suite: nothing like it yet
    assert np.isnan(t.loc[names[5], "train_s"]) and t.loc[names[5], "measure_s"] == 8.0  # no SAM run timed yet
    said = cost.missing_cost_sentence(t)
    assert said.startswith(f"The 5 experiments still missing here would take about {26 / 3600:.1f} hours "
                           "(2 of them; 3 have no like experiment")


def test_no_matched_learning_when_a_method_never_learns(tmp_path, monkeypatch):
    exps = _with_stage1(tmp_path, monkeypatch)
    for k in range(1, 5):  # SAM's own loss rises: it learns nothing
        for method, own in (("adamw-lr0.001", 2.0 - 0.1 * k), ("sam-rho2", 2.0 + 0.01 * k)):
            name = f"open-platypus-{method}-s1234-{k}of4"
            write_json_atomic(tmp_path / "smoke" / f"{name}.json", _entry(exps[name], name, own=own, s1=1.1))
    table = fronts.compare("smoke", "open-platypus", n_boot=20)
    assert len(table) == 1 and table["verdict"].iloc[0].startswith("no common learning")
    assert table["effect"].iloc[0] is fronts.Effect.NO_COMMON
    nl = frontier.never_learned(frontier.points("smoke"))
    assert nl[["family", "seed"]].values.tolist() == [["sam", 1234]]
    assert nl["own loss rose by up to"].iloc[0] == pytest.approx(0.04)
    assert nl["forgetting at the end"].iloc[0] == pytest.approx(0.1)


def test_no_verdict_when_most_resamples_share_no_learning(tmp_path, monkeypatch):
    exps = _with_stage1(tmp_path, monkeypatch)
    for k in range(1, 5):
        for method, own in (("adamw-lr0.001", 2.0 - 0.1 * k), ("sam-rho2", 2.0)):
            name = f"open-platypus-{method}-s1234-{k}of4"
            e = _entry(exps[name], name, own=own, s1=1.0 + 0.1 * k)
            if method == "sam-rho2" and k == 4:  # SAM learns 0.01 nats on average, and loses on half the examples
                e["heldout_loss"]["open-platypus"]["per_example"] = [[17.0, 10], [22.8, 10]] * 3
            write_json_atomic(tmp_path / "smoke" / f"{name}.json", e)
    row = fronts.compare("smoke", "open-platypus", levels=(0.5,), n_boot=200).iloc[0]
    assert row["learning level"] == pytest.approx(0.005)  # the point estimate has a common reach...
    assert row["comparable draws"] < 0.95  # ...that many resamples of the held-out examples do not
    assert row["verdict"].startswith("sam: inconclusive: comparable in only")
    assert row["effect"] is fronts.Effect.INCONCLUSIVE


def test_permutation_spearman_by_hand():
    # five points in the same order: rho = 1, and 2 of the 5! pairings reach |rho| = 1
    rho, p, how = exact.permutation_spearman([1, 2, 3, 4, 5], [0.1, 0.4, 0.5, 0.9, 2.0])
    assert rho == pytest.approx(1.0) and how == "exact" and p == pytest.approx(2 / 120)
    # twelve untied points in reverse order: exact, and 2 of the 12! pairings reach |rho| = 1
    rho, p, how = exact.permutation_spearman(range(12), np.arange(12)[::-1], n_resamples=2000)
    assert rho == pytest.approx(-1.0) and how == "exact" and p == pytest.approx(2 / math.factorial(12))
    # ties beyond 8 points: random pairings
    rho, p, how = exact.permutation_spearman([0] * 2 + list(range(10)), range(12), n_resamples=2000)
    assert how == "2000 random pairings" and p < 0.01


def test_permutation_spearman_matches_scipys_test_of_spearmanr():
    """The vectorised statistic (Pearson's r of the ranks) gives scipy's own p-value for spearmanr, with ties,
    over every pairing and over the same random pairings."""
    rng = np.random.default_rng(7)
    for n, resamples in ((6, np.inf), (12, 3000), (20, 3000)):
        x, y = rng.normal(size=n).round(1), rng.normal(size=n)
        x[:3], y[2:4] = x[0], y[2]  # ties in both
        ref = stats.permutation_test((x,), lambda a: stats.spearmanr(a, y).statistic, permutation_type="pairings",
                                     n_resamples=resamples, alternative="two-sided", random_state=0)
        rho, p, _ = exact.permutation_spearman(x, y, n_resamples=3000)
        assert rho == pytest.approx(stats.spearmanr(x, y).statistic) and p == pytest.approx(ref.pvalue), n


def test_stratified_spearman_ranks_within_groups_and_permutes_within_them():
    """Two groups, each perfectly ordered the same way within itself, but one sitting lower in x and higher in y:
    the pooled Spearman's rho is negative, the within-group one is 1; with one group it is Spearman's rho."""
    x, y, g = [1, 2, 3, 10, 11, 12], [10, 11, 12, 1, 2, 3], ["a"] * 3 + ["b"] * 3
    assert stats.spearmanr(x, y).statistic < 0
    rho, p, how = exact.stratified_spearman(x, y, g, n_resamples=4000)
    # 3! x 3! = 36 equally likely within-group pairings; |r| = 1 only when both groups keep (or both reverse) order
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / 36, abs=0.015) and "within groups" in how
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=7), rng.normal(size=7)
    assert exact.within_r(a, b, ["one"] * 7) == pytest.approx(stats.spearmanr(a, b).statistic)
    with pytest.raises(ValueError, match="within-group correlation is undefined"):
        exact.stratified_spearman([1, 2], [3, 4], ["a", "b"])
    # the same through flatness.correlations: pooled over the two "models" and within them
    from cfsam.analysis import flatness
    entries = {f"r{i}": {"landscape": {"flatness": {"SC": v}}} for i, v in enumerate(x)}
    fg = pd.Series(y, index=list(entries), dtype=float)
    pooled = flatness.correlations(entries, fg, n_boot=50).loc["SC"]
    within = flatness.correlations(entries, fg, n_boot=50, groups=pd.Series(g, index=list(entries))).loc["SC"]
    assert pooled["ranks"] == "flatter forgets more" and within["ranks"] == "sharper forgets more"
    assert within["Spearman rho"] == pytest.approx(1.0) and within["low"] <= 1.0 <= within["high"] + 1e-9


def test_exact_spearman_null_against_enumeration():
    """The dynamic program's null of D against every permutation, by hand for 3 and by itertools for 9, and
    the p-value it gives against the enumerated one (scipy's two-sided convention: twice the smaller tail)."""
    null3 = exact.spearman_null(3)
    assert {d: int(c) for d, c in enumerate(null3) if c} == {0: 1, 2: 2, 6: 2, 8: 1}
    perms = np.array(list(itertools.permutations(range(9))))
    d_all = ((perms - np.arange(9)) ** 2).sum(axis=1)
    assert np.array_equal(exact.spearman_null(9), np.bincount(d_all, minlength=9 * 80 // 3 + 1))
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=9), rng.normal(size=9)
    rho, p, how = exact.permutation_spearman(x, y)
    d = int(((stats.rankdata(x) - stats.rankdata(y)) ** 2).sum())
    by_hand = min(1.0, 2 * min((d_all <= d).mean(), (d_all >= d).mean()))
    assert how == "exact" and p == pytest.approx(by_hand) and rho == pytest.approx(stats.spearmanr(x, y).statistic)
    with pytest.raises(ValueError, match="allowed 1..14"):
        exact.spearman_null(15)


def test_the_papers_own_comparison_is_placed_like_the_frontier_points(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("smoke")
    for name, own, s1 in (("stage1", 2.0, 1.0), ("s2-open-platypus-adamw", 1.7, 1.3), ("s2-open-platypus-sam", 1.9, 1.1)):
        write_json_atomic(tmp_path / "smoke" / f"{name}.json", _entry(exps[name], name, own=own, s1=s1))
    t = frontier.paper_comparison("smoke")
    assert list(t.index) == ["s2-open-platypus-adamw", "s2-open-platypus-sam"]  # only those computed
    assert t.loc["s2-open-platypus-adamw", ["learning", "forgetting"]].tolist() == pytest.approx([0.3, 0.3])
    assert t.loc["s2-open-platypus-sam", ["learning", "forgetting"]].tolist() == pytest.approx([0.1, 0.1])
    assert t.loc["s2-open-platypus-sam", "epochs"] * 2 == t.loc["s2-open-platypus-adamw", "epochs"]
    # every example moves alike here, so each resample of the examples gives the point itself
    assert t.loc["s2-open-platypus-adamw", ["learning low", "learning high", "forgetting low", "forgetting high"]
                 ].tolist() == pytest.approx([0.3] * 4)


def test_end_points_average_each_settings_last_point_over_seeds():
    pts = pd.DataFrame([
        {"dataset": "d", "family": "adamw", "setting": 1e-4, "lr": 1e-4, "seed": 1, "at": 2, "of": 2, "learning": 0.4, "forgetting": 0.1},
        {"dataset": "d", "family": "adamw", "setting": 1e-4, "lr": 1e-4, "seed": 2, "at": 2, "of": 2, "learning": 0.2, "forgetting": 0.3},
        {"dataset": "d", "family": "adamw", "setting": 1e-4, "lr": 1e-4, "seed": 3, "at": 1, "of": 2, "learning": 9.0, "forgetting": 9.0},
        {"dataset": "d", "family": "sam", "setting": 2.0, "lr": 3e-4, "seed": 1, "at": 2, "of": 2, "learning": -0.1, "forgetting": 0.2}])
    pts["name"] = [f"p{i}" for i in range(len(pts))]
    t = frontier.end_points(pts)
    cols = ["seeds", "learning", "forgetting"]
    assert t.loc[("d", "adamw", 1e-4, 1e-4), cols].tolist() == pytest.approx([2, 0.3, 0.2])  # seed 3 has not ended
    assert t.loc[("d", "sam", 2.0, 3e-4), cols].tolist() == pytest.approx([1, -0.1, 0.2])
    assert t.loc[("d", "adamw", 1e-4, 1e-4), "entries"] == "p0 p1"  # each row names the entries it averages


def test_tables_show_settings_as_written_and_measures_at_their_precision():
    from cfsam.analysis import report

    df = pd.DataFrame({"lr": [5e-05, 3e-4], "learning": [0.41234, np.nan]},
                      index=pd.Index([0.05, 2.0], name="setting"))
    html = report.show(df, 3).to_html()
    for shown in (">5e-05<", ">0.0003<", ">0.05<", ">2<", ">0.412<", ">–<"):
        assert shown in html, shown
    assert ">0.000<" not in html


def test_sam_gradients_compare_the_step_at_w_and_at_the_ascent_point(tmp_path, monkeypatch):
    exps = _with_stage1(tmp_path, monkeypatch)
    for k in range(1, 5):
        name = f"open-platypus-sam-rho2-s1234-{k}of4"
        e = _entry(exps[name], name, own=2.0 - 0.05 * k, s1=1.1)
        e["train"] = {"grad_norm": [2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                      "sam_grad_norm": [20.0, 10.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]}
        write_json_atomic(tmp_path / "smoke" / f"{name}.json", e)
    t = frontier.sam_gradients("smoke")
    assert len(t) == 1 and t["rho"].iloc[0] == 2.0  # one row per run, from its end point
    assert t["|g(w+e)|, first quarter"].iloc[0] == pytest.approx(15.0)  # steps 1-2 of 8
    assert t["ratio, first quarter"].iloc[0] == pytest.approx(7.5)  # (10 + 5) / 2
    assert t["ratio, whole run"].iloc[0] == pytest.approx((10 + 5 + 6 * 2) / 8)
    assert t["learning at the end"].iloc[0] == pytest.approx(0.2)


def test_sam_gradient_sentence_ranks_the_ratio_against_learning():
    t = pd.DataFrame({"ratio, first quarter": [1.4, 6.0, 12.0, 20.0], "learning at the end": [0.4, 0.3, -0.1, -0.2]})
    assert frontier.sam_gradient_sentence(t).endswith("is -1.00.")  # larger ratio, less learning, every time
    assert frontier.sam_gradient_sentence(t.iloc[:2]) == ""  # too few runs to rank


def test_screen_sentence_names_tasks_left_out_and_held_without_warrant():
    """smoke's suite is [copa]: a screen where copa is at chance and arc_c above it says both."""
    table = pd.DataFrame({"above chance": [False, True]}, index=["copa", "arc_c"])
    text = screen.screen_sentence("smoke", table)
    assert text.startswith("Above chance by their interval: arc_c (1 of 2 screened).")
    assert "not in the suite: arc_c;" in text and "without being above chance here: copa." in text
    assert screen.screen_sentence("smoke", pd.DataFrame()) == ""


def test_chapter_sentences_say_each_verdict_and_what_does_not_reproduce():
    E, V = fronts.Effect, verdicts.Verdict
    table = pd.DataFrame([
        {"dataset": "gsm", "comparison": "sam vs adamw", "share of common reach": 0.5, "verdict": "sam: more forgetting",
         "effect": E.MORE},
        {"dataset": "gsm", "comparison": "wise_ft vs adamw", "share of common reach": 0.5,
         "verdict": "wise_ft: less forgetting", "effect": E.LESS},
        {"dataset": "gsm", "comparison": "asam vs adamw", "share of common reach": np.nan,
         "verdict": "no common learning: the most both learn on every seed is 0.000 nats", "effect": E.NO_COMMON}])
    never = pd.DataFrame([{"dataset": "gsm", "family": "asam", "setting": 2.0, "lr": 3e-4, "seed": 1234,
                           "own loss rose by up to": 0.0412, "forgetting at the end": 0.1}])
    assert book.shortfalls(table, never).split("\n") == [
        "- gsm, sam vs adamw: sam: more forgetting at 50% of the common reach",
        "- gsm, asam vs adamw: no common learning: the most both learn on every seed is 0.000 nats",
        "- asam at 2 (seed 1234) never learned gsm: its own held-out loss rose by up to 0.041 nats, and it forgot "
        "+0.100 nats of Alpaca by its end"]
    assert book.shortfalls(table.iloc[1:2], never.iloc[:0]).startswith("Nothing yet")
    nan = {"same-lr Δ": np.nan, "same-lr low": np.nan, "same-lr high": np.nan, "same-lr Δ learning": np.nan,
           "lr": None, "b setting": None, "same lr": V.NOT_COMPARABLE}
    cv = pd.DataFrame([{"claim": "sam-mitigates", "dataset": "gsm", "Δ forgetting": 0.0181, "low": 0.006, "high": 0.03,
                        "learning level": 0.157, "seeds": 3, "verdict": V.DEPENDS, "matched learning": V.OPPOSITE,
                        "reason": "", "same-lr Δ": -0.05, "same-lr low": -0.08, "same-lr high": -0.01,
                        "same-lr Δ learning": -0.1, "lr": 3e-4, "b setting": 0.05, "same lr": V.REPRODUCED},
                       {"claim": "sam-mitigates", "dataset": "chat", "Δ forgetting": np.nan, "low": np.nan,
                        "high": np.nan, "learning level": np.nan, "seeds": 1, "verdict": V.NOT_COMPARABLE,
                        "matched learning": V.NOT_COMPARABLE, "reason": "its AdamW reference learned 0.074", **nan}])
    assert book.frontier_claims_sentence(cv) == (
        "The paper's claims on the frontier: *sam-mitigates* on gsm: **depends on the view**; at matched learning "
        "(0.157 nats) Δ forgetting +0.018 [+0.006, +0.030] nats, opposite; at the same lr (0.0003, setting 0.05) "
        "-0.050 [-0.080, -0.010], reproduced, learning -0.100 (3 seeds); *sam-mitigates* on chat: no verdict yet, "
        "since its AdamW reference learned 0.074.")
    assert book.findings(cv).count("\n- ") == 1 and book.findings(cv.iloc[:0]).startswith("No frontier")
    assert book.frontier_claims_sentence(cv.iloc[:0]) == "No frontier comparison yet."
    fvf = pd.DataFrame([{"measure": "SC", "runs": 17, "Spearman rho": -0.75, "p": 0.0008, "ranks": "flatter forgets more"},
                        {"measure": "trace", "runs": 17, "Spearman rho": -0.03, "p": 0.9, "ranks": "flatter forgets more"}
                        ]).set_index("measure")
    assert book.flatness_sentence(fvf) == ("Flatness against forgetting, over 17 end points, SC ranks flatter forgets "
                                           "more (Spearman -0.75, p 0.0008); not significant: trace.")
    assert "no flatness measure has p < 0.05" in book.flatness_sentence(fvf.iloc[1:])


def test_a_short_run_beside_its_snapshot_and_its_front(tmp_path, monkeypatch):
    """AdamW 1e-4 learns 0.1 k and forgets 0.1 k at point k of 4; its run of half the steps learns 0.2 and
    forgets 0.25: the same learning as the 2/4 snapshot, 0.05 more forgetting, 0.05 above the front (the same
    examples throughout, so the interval is the point)."""
    from cfsam.analysis import snapshots

    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("cpu")
    write_json_atomic(tmp_path / "cpu" / "frontier-stage1.json",
                      _entry(exps["frontier-stage1"], "frontier-stage1", own=2.0, s1=1.0))
    for k in range(1, 5):
        name = f"metamathqa-adamw-lr0.0001-s1234-{k}of4"
        write_json_atomic(tmp_path / "cpu" / f"{name}.json", _entry(exps[name], name, own=2.0 - 0.1 * k, s1=1.0 + 0.1 * k))
    assert snapshots.short_runs("cpu", n_boot=20).empty  # the short run is not computed yet
    name = "metamathqa-adamw-lr0.0001-half-s1234"
    write_json_atomic(tmp_path / "cpu" / f"{name}.json", _entry(exps[name], name, own=1.8, s1=1.25))
    assert name not in set(frontier.points("cpu")["name"])  # never one of the frontier's own points
    row = snapshots.short_runs("cpu", n_boot=20).set_index("short run").loc[name]
    assert row["snapshot"] == "metamathqa-adamw-lr0.0001-s1234-2of4"
    assert row["Δ learning"] == pytest.approx(0.0) and row["Δ forgetting"] == pytest.approx(0.05)
    assert row["above its front"] == pytest.approx(0.05) and row["above low"] == pytest.approx(0.05)
    assert not row["on the same front"]


def test_frontier_figure_has_a_panel_per_set_in_rows_of_two_a_legend_outside_and_the_verdicts_level():
    import matplotlib

    matplotlib.use("Agg")
    from cfsam.analysis import plots

    pts = pd.DataFrame([{"dataset": ds, "family": fam, "learning": 0.1 * k, "forgetting": 0.05 * k * (1 + (fam == "sam"))}
                        for ds in ("a", "b", "c") for fam in ("adamw", "sam") for k in range(1, 4)])
    fig = plots.frontier(pts, fronts.curves(pts.assign(seed=1)), {"a": 0.15})
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["a", "b", "c"] and len(fig.axes) == 4  # 2 x 2, the fourth hidden
    assert shown[0].get_position().width > 0.3  # half the figure's width: readable at page width
    assert not any(ax.get_legend() for ax in fig.axes) and len(fig.legends) == 1  # one legend, outside the data
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["adamw", "sam", "verdict's learning level"]
    dashed = [ln for ln in shown[0].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_xdata()[0] == 0.15
    assert len([ln for ln in shown[0].get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) > 2]) == 2  # fronts
    # a run that unlearned far is left out of the view and counted, so the fronts stay readable
    far = pd.concat([pts, pd.DataFrame([{"dataset": "a", "family": "sam", "learning": -0.8, "forgetting": 0.3}])])
    ax = plots.frontier(far).axes[0]
    assert ax.get_xlim()[0] == pytest.approx(-0.25 * 0.3 * 1.05)
    assert [t.get_text() for t in ax.texts] == ["1 point further left (own loss rose)"]


def test_rows_of_the_committed_frontier_tables_find_their_files(monkeypatch):
    """Any number of the frontier's tables is two steps from its results file: the row names its entry."""
    from pathlib import Path

    monkeypatch.delenv("CFSAM_RESULTS", raising=False)
    pts = frontier.points("cpu")
    root = Path(__file__).resolve().parents[2] / "results" / "cpu"
    picked = pts.sample(12, random_state=0)
    for _, r in picked.iterrows():
        e = cache.read_entry(root / f"{r['name']}.json.gz")
        assert e["id"] == specs.experiment_id(specs.expand("cpu")[r["name"]])
        own = e["heldout_loss"][r["dataset"]]["per_example"]  # the learning on the row comes from this file
        start = cache.read_entry(root / "frontier-stage1.json.gz")["heldout_loss"][r["dataset"]]["per_example"]
        mean = lambda pe: sum(a for a, _ in pe) / sum(n for _, n in pe)  # noqa: E731
        assert r["learning"] == pytest.approx(mean(start) - mean(own), abs=1e-9)


def test_measures_on_a_bootstrap_draw_are_the_means_over_the_drawn_examples():
    """``measures`` weighs each example by how often a draw holds it (one matrix product for all points); the
    reference here indexes the draw itself, repeats included, and drops examples without tokens by hand."""
    rng = np.random.default_rng(7)

    def entry():
        def pe(n):
            tokens = rng.integers(0, 6, n).astype(float)  # some examples keep no response token
            return np.stack([rng.uniform(0.5, 3.0, n) * tokens, tokens], axis=1)
        return {"spec": {"measure": {"heldout": {"datasets": ["alpaca"]}}},
                "heldout_loss": {"alpaca": {"per_example": pe(9)}, "mmqa": {"per_example": pe(7)}},
                "eval_items": {t: {"idx": np.arange(5), "gold log-prob": rng.normal(size=5),
                                   "accuracy": rng.integers(0, 2, 5).astype(float)} for t in ("arc", "piqa")}}

    names = ["p1", "p2", "p3"]
    entries = {"start": entry(), **{n: entry() for n in names}}
    table = pd.DataFrame({"name": names, "dataset": "mmqa", "family": "adamw", "setting": 1e-4, "lr": 1e-4,
                          "seed": 1234, "at": [1, 2, 3], "of": 3})
    st = study.Study("synthetic", entries, table)
    draw = {"mmqa": rng.integers(0, 7, 7), "alpaca": rng.integers(0, 9, 9),
            ("eval", "arc"): rng.integers(0, 5, 5), ("eval", "piqa"): rng.integers(0, 5, 5)}
    assert len(set(draw["alpaca"])) < 9  # the draw repeats examples, so weights matter

    def by_hand(e, forgetting, d):
        each = forgetting == "heldout per example"
        own = lambda x: study.loss_mean(x["heldout_loss"]["mmqa"]["per_example"], d["mmqa"], each)
        learning = own(entries["start"]) - own(e)
        if forgetting in study.EVAL_KEYS:
            ability = lambda x: np.mean([x["eval_items"][t][forgetting][d[("eval", t)]].mean() for t in ("arc", "piqa")])
            return learning, ability(entries["start"]) - ability(e)
        s1 = lambda x: study.loss_mean(x["heldout_loss"]["alpaca"]["per_example"], d["alpaca"], each)
        return learning, s1(e) - s1(entries["start"])

    every = {k: np.arange(n) for k, n in (("mmqa", 7), ("alpaca", 9), (("eval", "arc"), 5), (("eval", "piqa"), 5))}
    for forgetting in study.FORGETTING:
        for d in (draw, None):
            got = study.measures(st, d, forgetting).set_index("name")
            for n in names:
                want = by_hand(entries[n], forgetting, d or every)
                assert got.loc[n, ["learning", "forgetting"]].tolist() == pytest.approx(want, rel=1e-12), (forgetting, n)
