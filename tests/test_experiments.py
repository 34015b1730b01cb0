"""The experiment registry, ids and staleness, and the paper-beside-ours tables, on synthetic entries."""
import json

import numpy as np
import pytest

from cfsam import experiments as E
from cfsam import paper, report
from cfsam.io import write_json_atomic

pytestmark = pytest.mark.mirror


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    return tmp_path


def test_every_notebook_reads_known_experiments_and_stage2_runs_share_stage1():
    exps = E.experiments("cpu")
    for nb in E.NOTEBOOKS:
        assert set(E.needed("cpu", [nb])) <= set(exps), nb
    stage1 = exps["stage1"]["run"]
    assert exps["s2-open-platypus-sam"]["run"]["parent"] == stage1
    assert exps["s2-open-platypus-sam"]["run"]["epochs"] == 1 and exps["s2-open-platypus-adamw"]["run"]["epochs"] == 2
    assert exps["wiseft-open-platypus-sam"]["run"]["stage2"] == exps["s2-open-platypus-sam"]["run"]
    assert exps["rehearsal-open-platypus-adamw"]["run"]["rehearsal"] == 0.1
    # paper's Table 1: landscapes of Alpaca, ->Open-Platypus, ->Auto-Wiki
    assert all("landscape" in exps[n]["measure"] for n in E.needed("cpu", ["fig1"]))
    with pytest.raises(ValueError, match="unknown notebook.*allowed: results, fig1"):
        E.needed("cpu", ["fig9"])


def test_ids_follow_the_spec_and_the_data():
    a = E.experiments("smoke")["stage1"]
    b = json.loads(json.dumps(a))
    assert E.experiment_id(a) == E.experiment_id(b)
    b["run"]["lr"] *= 2
    assert E.experiment_id(a) != E.experiment_id(b)


def test_missing_ok_and_stale_entries(results):
    exp = E.experiments("smoke")["base"]
    assert E.load_results("smoke", ["base"])["base"]["status"] == "missing"
    assert "cfsam run-missing --preset smoke --only base" in E.load_results("smoke", ["base"])["base"]["command"]
    write_json_atomic(results / "smoke" / "base.json", {"id": E.experiment_id(exp), "name": "base", "spec": exp})
    assert E.load_results("smoke", ["base"])["base"]["status"] == "ok"
    write_json_atomic(results / "smoke" / "base.json", {"id": "0" * 16, "name": "base", "spec": exp})
    assert E.load_results("smoke", ["base"])["base"]["status"] == "stale"
    assert E.run_missing("smoke", only=["base"], dry_run=True) == ["base"]


def _fake_entry(preset, name, values: dict):
    """An entry whose categories hold given percentages (a synthetic fixture, never a result)."""
    exp = E.experiments(preset)[name]
    cats = {c: {"score": values[c] / 100} for c in report.CATEGORIES}
    return {"id": E.experiment_id(exp), "name": name, "spec": exp, "eval": {"categories": cats, "tasks": {}}}


def test_compare_puts_the_paper_beside_ours_and_recomputes_delta(results):
    printed = paper.paper_table("2a").xs("llama2-7b", level="model")
    rows = {"stage1": ("none", "", "adamw", 3), "s2-open-platypus-adamw": ("none", "open-platypus", "adamw", 2),
            "s2-open-platypus-sam": ("none", "open-platypus", "sam", 1)}
    for name, key in rows.items():
        values = printed.loc[key].to_dict()
        write_json_atomic(results / "cpu" / f"{name}.json", _fake_entry("cpu", name, values))
    table = report.compare("cpu", "2a", E.needed("cpu", ["tab2a"]))
    got = table.loc["-> Open-Platypus (w/ SAM, 1 ep)"]
    assert got[("AVG", "ours - paper")] == pytest.approx(0, abs=1e-9)
    # our Delta, computed by the paper's convention from our AVGs, equals the paper's printed Delta (+7.01)
    assert got[("Delta", "ours")] == pytest.approx(7.01, abs=0.01)
    assert table.loc["-> Open-Platypus (w/o SAM, 2 ep)", ("Delta", "ours")] == pytest.approx(-6.70, abs=0.01)
    assert table.loc["-> ShareGPT (w/o SAM, 2 ep)", ("", "status")] == "missing"
    assert np.isnan(table.loc["-> ShareGPT (w/o SAM, 2 ep)", ("AVG", "ours")])
    assert "missing" in report.missing_note(table, "cpu")
