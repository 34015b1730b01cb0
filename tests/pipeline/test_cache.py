"""The experiment registry, ids and staleness, and the paper-beside-ours tables, on synthetic entries."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cfsam.analysis import paper
from cfsam.analysis import report
from cfsam.pipeline import cache
from cfsam.pipeline import chapters
from cfsam.pipeline import runner
from cfsam.pipeline import specs
from cfsam.core.io import write_json_atomic

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    return tmp_path


def test_every_chapter_reads_known_experiments_and_stage2_runs_share_stage1():
    exps = specs.expand("cpu")
    assert chapters.chapters()[:3] == ["frontier", "results", "fig1"]  # _toc.yml's order
    for nb in chapters.chapters():
        assert set(specs.needed("cpu", [nb])) <= set(exps), nb
    stage1 = exps["stage1"]["run"]
    assert exps["s2-open-platypus-sam"]["run"]["model"] == stage1
    assert exps["s2-open-platypus-sam"]["run"]["epochs"] == 1 and exps["s2-open-platypus-adamw"]["run"]["epochs"] == 2
    assert exps["wiseft-open-platypus-sam"]["run"]["wise_ft"]["stage2"] == exps["s2-open-platypus-sam"]["run"]
    assert exps["rehearsal-open-platypus-adamw"]["run"]["rehearsal_fraction"] == 0.1
    # paper's Table 1: landscapes of Alpaca, ->Open-Platypus, ->Auto-Wiki
    assert all("landscape" in exps[n]["measure"] for n in specs.needed("cpu", ["fig1"]))
    # Table 2(b) at each of the preset's sizes: the default model, then Gemma 3 270M (the pretrained base)
    per_size = ["base", "stage1", "s2-open-platypus-adamw", "s2-open-platypus-sam"]
    assert specs.needed("cpu", ["tab2b"]) == per_size + [f"gemma3-270m/{n}" for n in per_size]
    assert exps["gemma3-270m/s2-open-platypus-sam"]["run"]["model"] == exps["gemma3-270m/stage1"]["run"]
    with pytest.raises(ValueError, match="unknown chapter.*allowed: frontier, results, fig1"):
        specs.needed("cpu", ["fig9"])
    # the frontier chapter reads every frontier experiment (a pattern that missed the "-1of4" points once
    # left run-missing --notebooks frontier running the Wise-FT merges only)
    frontier = [n for n, e in exps.items() if e.get("group") == "frontier"]
    assert set(frontier) <= set(specs.needed("cpu", ["frontier"])) and len(frontier) > 90


def test_a_chapter_declares_its_experiments_in_its_metadata(tmp_path):
    nb = {"cells": [], "metadata": {"cfsam": {"experiments": ["s2-*-sam"], "exclude": ["*rehearsal*"]}},
          "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "mine.ipynb").write_text(json.dumps(nb))
    (tmp_path / "scratch.ipynb").write_text(json.dumps(nb))  # not in the table of contents: no chapter
    (tmp_path / "_toc.yml").write_text("parts:\n  - chapters:\n      - file: notebooks/mine\n")
    names = ["base", "s2-a-sam", "s2-b-adamw", "s2-c-sam", "rehearsal-x-sam"]
    assert chapters.chapters(tmp_path, tmp_path / "_toc.yml") == ["mine"]
    assert chapters.chapter_experiments("mine", names, tmp_path) == ["s2-a-sam", "s2-c-sam"]


def test_stage_specs_speak_the_trainers_vocabulary():
    from cfsam.training import config

    for exp in specs.expand("cpu").values():
        run = exp["run"]
        while specs.run_kind(run) == "stage":
            assert set(run) <= {"model", "dataset", *config.DEFAULTS}, set(run) - {"model", "dataset", *config.DEFAULTS}
            run = run["model"] if isinstance(run["model"], dict) else {"model": run["model"]}


def test_ids_follow_the_spec_not_paths_data_or_version(monkeypatch, tmp_path):
    a = specs.expand("smoke")["stage1"]
    b = json.loads(json.dumps(a))
    assert specs.experiment_id(a) == specs.experiment_id(b)
    b["run"]["lr"] *= 2
    assert specs.experiment_id(a) != specs.experiment_id(b)
    c = json.loads(json.dumps(a))
    c["run"]["checkpoint_every"] = 99  # how it runs, not what it trains
    assert specs.experiment_id(a) == specs.experiment_id(c)
    ids = {n: specs.experiment_id(e) for n, e in specs.expand("smoke").items()}
    monkeypatch.delenv("CFSAM_DATA_DIR", raising=False)  # no mirror: the same ids
    monkeypatch.setenv("CFSAM_CACHE", str(tmp_path / "elsewhere"))  # another cache: the same ids
    assert {n: specs.experiment_id(e) for n, e in specs.expand("smoke").items()} == ids
    monkeypatch.setattr(specs, "MEASURE_VERSION", specs.MEASURE_VERSION + 1)
    assert specs.experiment_id(a) != ids["stage1"]


def test_missing_ok_and_stale_entries(results):
    exp = specs.expand("smoke")["base"]
    assert cache.load_results("smoke", ["base"])["base"]["status"] == "missing"
    assert "cfsam run-missing --preset smoke --only base" in cache.load_results("smoke", ["base"])["base"]["command"]
    write_json_atomic(results / "smoke" / "base.json", {"id": specs.experiment_id(exp), "name": "base", "spec": exp})
    assert cache.load_results("smoke", ["base"], verify_data=False)["base"]["status"] == "ok"
    write_json_atomic(results / "smoke" / "base.json", {"id": "0" * 16, "name": "base", "spec": exp})
    assert cache.load_results("smoke", ["base"])["base"]["status"] == "stale"
    assert runner.run_missing("smoke", only=["base"], dry_run=True) == ["base"]


def test_entries_read_without_the_data_and_are_checked_with_it(results, monkeypatch):
    exp = specs.expand("smoke")["stage1"]
    entry = {"id": specs.experiment_id(exp), "name": "stage1", "spec": exp, "provenance": {"data": cache.data_hashes(exp)}}
    write_json_atomic(results / "smoke" / "stage1.json", entry)
    got = cache.load_results("smoke", ["stage1"], verify_data=True)["stage1"]  # checked even on the fixtures
    assert (got["status"], got["data_verified"]) == ("ok", True)
    entry["provenance"]["data"]["alpaca"] = {"alpaca_data.json": "0" * 64}
    write_json_atomic(results / "smoke" / "stage1.json", entry)
    got = cache.load_results("smoke", ["stage1"], verify_data=True)["stage1"]
    assert got["status"] == "stale" and "alpaca" in got["why"]
    monkeypatch.delenv("CFSAM_DATA_DIR")  # a clone without the mirror: current, not verified
    got = cache.load_results("smoke", ["stage1"])["stage1"]
    assert (got["status"], got["data_verified"]) == ("ok", False)


def test_the_test_fixtures_never_turn_an_entry_stale(results, monkeypatch):
    """An entry computed on the real data, read where CFSAM_DATA_DIR is the fixtures (as in the tests): current,
    its data not verified here, as in a clone without the mirror; the committed results stay current."""
    exp = specs.expand("smoke")["stage1"]
    entry = {"id": specs.experiment_id(exp), "name": "stage1", "spec": exp,
             "provenance": {"data": {"alpaca": {"alpaca/alpaca_5000.json": "fc1add24" + "0" * 56}}}}
    write_json_atomic(results / "smoke" / "stage1.json", entry)
    monkeypatch.setenv("CFSAM_DATA_DIR", str(FIXTURES))
    got = cache.load_results("smoke", ["stage1"])["stage1"]
    assert (got["status"], got["data_verified"]) == ("ok", False)
    assert not cache.data_present()


@pytest.mark.parametrize("content,suffix", [(b'{"id": "x", "name": ', ".json"), (b"", ".json"), (b"\xff\xfe{}", ".json"),
                                            (b"[]", ".json"), (b"null", ".json"), (None, ".json"),
                                            (gzip.compress(b'{"id": "x"}')[:12], ".json.gz"),  # truncated
                                            (b'{"id": "x"}', ".json.gz")])  # not gzip at all
def test_a_damaged_entry_is_named_and_blocks_nothing_else(results, content, suffix):
    exp = specs.expand("smoke")["base"]
    write_json_atomic(results / "smoke" / "stage1.json", {"id": specs.experiment_id(exp), "spec": exp})
    path = results / "smoke" / f"base{suffix}"
    if content is None:
        path.mkdir(parents=True)  # a directory in a file's place
    else:
        path.write_bytes(content)
    got = cache.load_results("smoke", ["base", "stage1"])
    assert got["base"]["status"] == "damaged" and str(path) in got["base"]["why"]
    assert got["base"]["command"] == "cfsam run-missing --preset smoke --only base"
    assert got["stage1"]["status"] == "stale"  # the other entries are still read
    assert runner.run_missing("smoke", only=["base"], dry_run=True) == ["base"]  # and it can be recomputed


def test_doctor_reports_damaged_stale_and_good_entries_in_one_run(results, capsys):
    from cfsam import cli

    exps = specs.expand("smoke")
    write_json_atomic(results / "smoke" / "base.json", {"id": specs.experiment_id(exps["base"]), "spec": exps["base"],
                                                        "provenance": {"data": cache.data_hashes(exps["base"])}})
    write_json_atomic(results / "smoke" / "stage1.json", {"id": "0" * 16, "spec": exps["stage1"]})
    (results / "smoke" / "s2-auto-wiki-sam.json").write_text('{"id": ')
    assert cli.main(["doctor", "--preset", "smoke"]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[1]: line.split()[0] for line in out.splitlines() if line[:1].isalpha() and len(line.split()) > 1}
    assert (lines["base"], lines["stage1"], lines["s2-auto-wiki-sam"], lines["s2-auto-wiki-adamw"]) == \
        ("ok", "stale", "damaged", "missing")
    assert "cfsam run-missing --preset smoke --only s2-auto-wiki-sam" in out


def _fake_entry(preset, name, values: dict):
    """An entry whose categories hold given percentages (a synthetic fixture, never a result)."""
    exp = specs.expand(preset)[name]
    cats = {c: {"score": values[c] / 100} for c in report.CATEGORIES}
    return {"id": specs.experiment_id(exp), "name": name, "spec": exp, "eval": {"categories": cats, "tasks": {}},
            "provenance": {"data": cache.data_hashes(exp)}}


def test_compare_puts_the_paper_beside_ours_and_recomputes_delta(results):
    printed = paper.paper_table("2a").xs("llama2-7b", level="model")
    rows = {"stage1": ("none", "", "adamw", 3), "s2-open-platypus-adamw": ("none", "open-platypus", "adamw", 2),
            "s2-open-platypus-sam": ("none", "open-platypus", "sam", 1)}
    for name, key in rows.items():
        values = printed.loc[key].to_dict()
        write_json_atomic(results / "cpu" / f"{name}.json", _fake_entry("cpu", name, values))
    table = report.compare("cpu", "2a", specs.needed("cpu", ["tab2a"]))
    got = table.loc["-> Open-Platypus (w/ SAM, 1 ep)"]
    assert got[("AVG", "ours - paper")] == pytest.approx(0, abs=1e-9)
    # our Delta, computed by the paper's convention from our AVGs, equals the paper's printed Delta (+7.01)
    assert got[("Delta", "ours")] == pytest.approx(7.01, abs=0.01)
    assert table.loc["-> Open-Platypus (w/o SAM, 2 ep)", ("Delta", "ours")] == pytest.approx(-6.70, abs=0.01)
    assert table.loc["-> ShareGPT (w/o SAM, 2 ep)", ("", "status")] == "missing"
    assert np.isnan(table.loc["-> ShareGPT (w/o SAM, 2 ep)", ("AVG", "ours")])
    assert "missing" in report.missing_note(table, "cpu")


def test_entries_are_written_compressed_and_plain_ones_still_read(results):
    """The runner writes <name>.json.gz; a plain <name>.json (older caches, a copy by hand) reads the same,
    and the compressed one wins where both are there."""
    exps = specs.expand("smoke")
    good = {"id": specs.experiment_id(exps["base"]), "spec": exps["base"], "value": 0.1 + 0.2,
            "provenance": {"data": cache.data_hashes(exps["base"])}}
    assert cache.entry_path("smoke", "base").name == "base.json.gz"
    write_json_atomic(results / "smoke" / "base.json", {**good, "id": "0" * 16})  # stale, plain
    assert cache.load_results("smoke", ["base"])["base"]["status"] == "stale"
    write_json_atomic(cache.entry_path("smoke", "base"), good)
    got = cache.load_results("smoke", ["base"])["base"]
    assert got["status"] == "ok" and got["value"] == 0.1 + 0.2  # floats exactly as written
    assert gzip.decompress((results / "smoke" / "base.json.gz").read_bytes()).startswith(b"{")
    a = (results / "smoke" / "base.json.gz").read_bytes()
    write_json_atomic(cache.entry_path("smoke", "base"), good)
    assert (results / "smoke" / "base.json.gz").read_bytes() == a  # no timestamp: same entry, same bytes
    assert not [r for r in cache.check("smoke") if r["status"] == "orphan"]


def test_every_committed_entry_is_current(monkeypatch):
    """A change to the specs that moved an id would make committed results read stale: every results file of
    the study presets is one of its preset's experiments, under its current id (data not checked here)."""
    monkeypatch.delenv("CFSAM_RESULTS", raising=False)
    for preset in ("cpu", "cpu-pilot"):
        files = sorted(p.name.removesuffix(".json.gz").removesuffix(".json")
                       for p in cache.results_dir(preset).glob("*.json*"))
        got = cache.load_results(preset, files, verify_data=False)
        assert {n: got[n]["status"] for n in files} == {n: "ok" for n in files}, preset


def test_an_unknown_name_gets_the_names_it_may_mean_not_the_whole_registry():
    exps = specs.expand("cpu")
    run = "metamathqa-adamw-lr0.0001-s1234"  # a frontier run's own name: the preset has its points only
    assert run not in exps and f"{run}-1of4" in exps
    with pytest.raises(cache.UsageError) as e:
        cache.load_results("cpu", [run, "stage1", "s2-metamathqa-adamx", "no-such-thing"])
    msg = str(e.value)
    assert f"did you mean {run}-1of4, {run}-2of4, {run}-3of4, {run}-4of4?" in msg
    assert "'s2-metamathqa-adamx' (did you mean s2-metamathqa-adamw" in msg
    assert "'no-such-thing' (no close name)" in msg and "'stage1'" not in msg
    assert f"all {len(exps)} names: cfsam status --preset cpu" in msg and len(msg) < 600
