"""Does a flatter start forget less (analysis/starts.py)? Synthetic entries (never results) whose answer is
known by hand: the SAM start learned Alpaca less (0.4 nats against 0.5) and forgets half as fast."""
import pandas as pd
import pytest
import yaml

from cfsam.analysis import starts
from cfsam.analysis.verdicts import Verdict
from cfsam.core.io import write_json_atomic
from cfsam.pipeline import cache, presets, specs


def _entry(exp, name, s1, own, sc=None):
    """Every held-out example of a set at the same mean loss (10 tokens each); ``sc``: a landscape with SC."""
    sets = exp["measure"]["heldout"]["datasets"]
    per = {sets[0]: s1, **{d: own for d in sets[1:]}}
    out = {"id": specs.experiment_id(exp), "name": name, "spec": exp, "provenance": {"data": cache.data_hashes(exp)},
           "heldout_loss": {d: {"loss": v, "n": 6, "per_example": [[10 * v, 10]] * 6} for d, v in per.items()}}
    if sc is not None:
        out["landscape"] = {"flatness": {"SC": {"mean": sc}}, "curvature": {}}
    return out


def _preset(tmp_path, monkeypatch, rhos=(2.0,)):
    p = yaml.safe_load(presets.registered_file("smoke").read_text())
    p["starts"] = {"sam_rho": list(rhos), "seeds": 1, "seeded_lr": [1.0e-3]}
    path = tmp_path / "smoke-starts.yaml"
    path.write_text(yaml.safe_dump(p))
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path / "results"))
    exps = specs.expand(str(path))
    out = tmp_path / "results" / "smoke-starts"

    def put(name, **kw):
        write_json_atomic(out / f"{name}.json", _entry(exps[name], name, **kw))

    put("base", s1=1.5, own=2.2)
    put("frontier-stage1", s1=1.0, own=2.0)
    put("frontier-stage1-flatness", s1=1.0, own=2.0, sc=5.0)
    put("frontier-stage1-sam-rho2", s1=1.1, own=2.0, sc=3.0)
    for k in range(1, 5):  # AdamW's start: learns 0.1 k, forgets 0.2 k; the SAM start's: learns 0.1 k, forgets 0.1 k
        put(f"open-platypus-adamw-lr0.001-s1234-{k}of4", s1=1.0 + 0.2 * k, own=2.0 - 0.1 * k)
        put(f"open-platypus-from-sam-rho2-adamw-lr0.001-s1234-{k}of4", s1=1.1 + 0.1 * k, own=2.0 - 0.1 * k)
    if 4.0 in rhos:  # the flattest start (SC 1) learns Alpaca as AdamW's did and forgets a quarter as fast
        put("frontier-stage1-sam-rho4", s1=1.0, own=2.0, sc=1.0)
        for k in range(1, 5):
            put(f"open-platypus-from-sam-rho4-adamw-lr0.001-s1234-{k}of4", s1=1.0 + 0.05 * k, own=2.0 - 0.1 * k)
    return str(path)


@pytest.fixture
def preset(tmp_path, monkeypatch):
    return _preset(tmp_path, monkeypatch)


def test_the_flatter_start_forgets_less_against_its_own_start_and_the_base(preset):
    t = starts.starts_table(preset, n_boot=20)
    assert t.loc["frontier-stage1", "learned Alpaca"] == pytest.approx(0.5)
    assert t.loc["frontier-stage1-sam-rho2", "learned Alpaca"] == pytest.approx(0.4)
    assert not t.loc["frontier-stage1-sam-rho2", "learned as much as AdamW's"]  # the calibration rule fails
    assert t.loc["frontier-stage1-sam-rho2", "SC"] == 3.0 and t.loc["frontier-stage1", "SC"] == 5.0

    v = starts.verdicts(preset, n_boot=20).set_index("forgetting against")
    own, base = v.loc["own start"], v.loc["base"]
    # reach 0.4, level 0.2: against its own start F_adamw = 2L = 0.4, F_sam = L = 0.2
    assert own["Δ forgetting"] == pytest.approx(-0.2) and own["same-lr Δ"] == pytest.approx(-0.25)
    # against the base: AdamW's points at -0.5 + 0.2 k, the SAM start's at -0.4 + 0.1 k (it learned Alpaca less)
    assert base["Δ forgetting"] == pytest.approx(-0.1) and base["same-lr Δ"] == pytest.approx(-0.15)
    assert (v["verdict"] == Verdict.REPRODUCED).all() and (v["start"] == "SAM rho 2").all()
    names = set(own["entries"].split())
    assert names == {f"open-platypus-{m}-s1234-{k}of4" for m in ("adamw-lr0.001", "from-sam-rho2-adamw-lr0.001")
                     for k in range(1, 5)}
    said = starts.sentence(v.reset_index(), t)
    assert said.startswith("Does a flatter start forget less? the SAM rho 2 start against AdamW's, forgetting "
                           "against own start: **reproduced**; at matched learning (0.200 nats) Δ forgetting -0.200")
    assert said.endswith("As starts: SAM 2 is flatter by SC (3 against 5).")
    first = starts.headline(v.reset_index(), preset)  # the book's first page
    assert "forgetting against own start: **reproduced** (matched learning -0.200 [-0.200, -0.200]" in first
    assert "{doc}" not in first  # a notebook's Markdown output is CommonMark: a MyST role would print as text


def test_each_starts_forgetting_at_one_level_and_its_correlation_with_flatness(tmp_path, monkeypatch):
    preset = _preset(tmp_path, monkeypatch, rhos=(2.0, 4.0))
    t = starts.starts_table(preset, n_boot=20)
    # paired over the same held-out examples: rho 2 learned 0.1 nats less than AdamW's start, rho 4 as much
    assert t["Δ learned vs AdamW"].to_dict() == pytest.approx({"frontier-stage1": 0.0, "frontier-stage1-sam-rho2": -0.1,
                                                               "frontier-stage1-sam-rho4": 0.0})
    assert t.loc["frontier-stage1-sam-rho4", "learned as much as AdamW's"]
    f = starts.start_forgetting(preset).set_index(["forgetting against", "start"])
    # every start reaches 0.4 nats, so the level is 0.2 (k = 2): against its own start F = 2L, L and L/2;
    # against the base, the start's own rise from it (-0.5, -0.4, -0.5) plus that
    assert f["learning level"].tolist() == pytest.approx([0.2] * 6) and (f["seeds"] == 1).all()
    assert f["forgetting"].to_dict() == pytest.approx({
        ("own start", "frontier-stage1"): 0.4, ("own start", "frontier-stage1-sam-rho2"): 0.2,
        ("own start", "frontier-stage1-sam-rho4"): 0.1, ("base", "frontier-stage1"): -0.1,
        ("base", "frontier-stage1-sam-rho2"): -0.2, ("base", "frontier-stage1-sam-rho4"): -0.4})
    c = starts.correlation(preset, n_boot=20).set_index("forgetting against", append=True)
    # SC 5 > 3 > 1 against forgetting 0.4 > 0.2 > 0.1: a perfect ranking of 3, exact p 2/6, and no interval
    own = c.loc[("SC", "own start")]
    assert own["Spearman rho"] == pytest.approx(1.0) and own["p"] == pytest.approx(1 / 3) and own["runs"] == 3
    assert own["low"] != own["low"] and own["the paper's way"]
    # against the base, rho 4's start learned Alpaca more than rho 2's and ends lowest: SC 5, 3, 1 ranks -0.1 > -0.2 > -0.4
    assert c.loc[("SC", "base"), "Spearman rho"] == pytest.approx(1.0)
    assert {"frontier-stage1-flatness", "frontier-stage1-sam-rho4"} <= set(own["entries"].split())
    said = starts.correlation_sentence(c.reset_index("forgetting against"))
    assert "Across the 3 starts" in said and "SC +1.00" in said and "p < 0.33" in said


def test_no_starts_computed_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    assert starts.verdicts("smoke").empty and starts.starts_table("smoke").empty
    assert "run-missing" in starts.sentence(pd.DataFrame(), pd.DataFrame())
    assert "the smoke preset does not plan it" in starts.headline(pd.DataFrame(), "smoke")


def test_the_relation_to_watts_et_al_follows_the_verdicts():
    def rows(*vs):
        return pd.DataFrame([{"verdict": v, "forgetting against": ref, "Δ forgetting": -0.002, "same-lr Δ": -0.004}
                             for v, ref in vs])
    some = starts.relation(rows((Verdict.REPRODUCED, "own start"), (Verdict.INCONCLUSIVE, "base")))
    assert "less in 1 of 2 comparisons and more in none" in some and "by 0.004 nats at most" in some
    assert "Against the common base model" in some
    assert "do not agree" in starts.relation(rows((Verdict.REPRODUCED, "own start"), (Verdict.OPPOSITE, "base")))
    assert starts.relation(rows((Verdict.INCONCLUSIVE, "base"))).startswith("No comparison is decisive")
    assert "forgot more here" in starts.relation(rows((Verdict.OPPOSITE, "base")))
