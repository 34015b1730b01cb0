"""Retracted entries (results/<preset>/retracted.yaml, issue 26): a listed entry reads stale with the
reason, its numbers leave the tables, and a recomputed entry of the same experiment is current again."""
import json

import pytest

from cfsam.analysis import report
from cfsam.core.io import write_json_atomic
from cfsam.pipeline import cache, runner, specs

START = "2026-11-30T00:01:32+00:00"


@pytest.fixture
def smoke_base(tmp_path, monkeypatch):
    """A current smoke `base` entry (with one metric) in a private results folder."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exp = specs.expand("smoke")["base"]
    entry = {"id": specs.experiment_id(exp), "name": "base", "spec": exp, "provenance": {"start": START, "data": cache.data_hashes(exp)},
             "heldout_loss": {"alpaca": {"loss": 2.116, "n": 96}}}
    write_json_atomic(cache.entry_path("smoke", "base"), entry)
    return entry


def retract(entry, start=START, reason="wrong EOS\n  on the device"):
    path = cache.results_dir("smoke") / cache.RETRACTED
    path.write_text(f"- reason: {json.dumps(reason)}\n  entries:\n    base: {{id: {entry['id']}, start: '{start}'}}\n")
    return path


def test_a_retracted_entry_reads_stale_with_its_reason_and_leaves_the_tables(smoke_base):
    assert cache.load_results("smoke", ["base"], verify_data=False)["base"]["status"] == "ok"
    assert report.frame("smoke", ["base"]).loc["base", "loss:alpaca"] == pytest.approx(2.116)
    retract(smoke_base)
    got = cache.load_results("smoke", ["base"], verify_data=False)["base"]
    assert got["status"] == "stale"
    assert got["why"] == "retracted (retracted.yaml): wrong EOS on the device"
    assert got["command"] == "cfsam run-missing --preset smoke --only base"
    assert cache.status_of("smoke", "base", specs.expand("smoke")["base"]) == "stale"  # what the runner asks
    assert "base" in runner.run_missing("smoke", only=["base"], dry_run=True)          # so it recomputes it
    row = report.frame("smoke", ["base"]).loc["base"]
    assert row["status"] == "stale" and "loss:alpaca" not in row.index  # as a missing one: no numbers


def test_a_recomputed_entry_is_current_again(smoke_base):
    retract(smoke_base, start="2026-11-29T23:59:59+00:00")  # the listed one started earlier: this is another
    assert cache.load_results("smoke", ["base"], verify_data=False)["base"]["status"] == "ok"


def test_a_malformed_retraction_file_names_itself(smoke_base):
    path = cache.results_dir("smoke") / cache.RETRACTED
    path.write_text("- reason: x\n  entries: {base: c65774855a2fd65c}\n")
    with pytest.raises(ValueError, match=r"retracted.yaml: .* is not a list of \{reason: text, entries"):
        cache.load_results("smoke", ["base"])


def test_the_wrong_h200_entries_read_stale_and_the_screen_stays(monkeypatch):
    """The committed h200 retraction: every entry it lists exists with that id and start (no typo leaves one
    reading as a result), and reads stale with the reason; the screen (eval only, unaffected) stays ok."""
    monkeypatch.delenv("CFSAM_RESULTS", raising=False)
    listed = cache.retractions("h200")
    assert len(listed) == 60 and "screen" not in listed and "base" in listed
    got = cache.load_results("h200", [*listed, "screen"], verify_data=False)
    assert {n: got[n]["status"] for n in listed} == {n: "stale" for n in listed}
    assert all("transformers 5.17" in got[n]["why"] and "<|im_start|>" in got[n]["why"] for n in listed)
    assert got["screen"]["status"] == "ok"
    # a chapter's note says why they are not shown, once per reason
    from cfsam.analysis import report

    note = report.missing_note(report.frame("h200", [*listed, "screen"]), "h200")
    assert note.startswith("60 result(s) are not available here (60 stale)")
    assert note.count("60 of them are retracted (retracted.yaml): ") == 1 and "transformers 5.17" in note
