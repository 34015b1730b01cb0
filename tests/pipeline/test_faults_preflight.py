"""Issue 27 #5, #6, #10: what would stop run-missing part way is found before its first experiment; a write that
fails names the path and the free space and leaves no partial file."""
import errno
import pathlib

import pytest
import yaml

from cfsam.core import io, registry
from cfsam.data import formatting
from cfsam.pipeline import cache, presets, runner
from cfsam.pipeline.preflight import PreflightError

SMOKE = registry.ROOT / "presets" / "smoke.yaml"


def _preset(tmp_path, name: str, change) -> str:
    p = yaml.safe_load(SMOKE.read_text())
    change(p)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(p))
    return str(path)


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path / "results"))
    calls = []
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: calls.append(a))  # nothing may start
    return calls


def test_n_train_beyond_the_set_stops_before_the_first_experiment(tmp_path, results):
    preset = _preset(tmp_path, "big", lambda p: p["stage2"].update(n_train=10_000_000))
    have = len(formatting.load_records("open-platypus", "train"))
    with pytest.raises(PreflightError, match=rf"experiment s2-open-platypus-\S+: n_train=10000000 but "
                                             rf"'open-platypus' has only {have} train examples"):
        runner.run_missing(preset)
    assert results == [] and not list((tmp_path / "results").rglob("*.json*"))


def test_heldout_and_landscape_sizes_are_checked_too(tmp_path, results):
    preset = _preset(tmp_path, "held", lambda p: p["heldout"].update(n=100_000))
    with pytest.raises(PreflightError, match=r"heldout.n=100000 but 'alpaca' has only \d+ heldout examples"):
        runner.run_missing(preset)
    preset = _preset(tmp_path, "land", lambda p: p["landscape"].update(n_examples=100_000))
    # stage 1's landscape sits after the held-out examples, so it may have only the records after them
    n, have = presets.load_preset(preset)["heldout"]["n"], len(formatting.load_records("alpaca", "heldout"))
    with pytest.raises(PreflightError, match=rf"experiment stage1: landscape.n_examples=100000 but 'alpaca' has only "
                                             rf"{have} heldout examples, and its come after the first {n}; "
                                             rf"lower landscape.n_examples to at most {have - n}$"):
        runner.run_missing(preset, only=["stage1"])
    assert results == []


def test_screen_limit_zero_is_refused_when_the_preset_loads(tmp_path):
    preset = _preset(tmp_path, "screen0", lambda p: p["frontier"]["screen"].update(limit=0))
    with pytest.raises(presets.PresetError, match=r"frontier.screen.limit=0 must be a positive integer"):
        presets.load_preset(preset)


def test_an_unwritable_results_folder_stops_before_measuring(tmp_path, results, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CFSAM_RESULTS", str(blocker / "results"))  # under a file: never a folder, even for root
    with pytest.raises(PreflightError, match=rf"the results folder {blocker}/results/smoke cannot be written "
                                             r".*GB free.*set CFSAM_RESULTS"):
        runner.run_missing("smoke", only=["base"])
    assert results == []


def test_a_full_disk_names_the_path_and_leaves_no_partial_file(tmp_path, monkeypatch):
    real = pathlib.Path.write_bytes

    def full(self, data):  # half the bytes land, then the disk is full
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    target = tmp_path / "smoke" / "base.json.gz"
    with pytest.raises(OSError, match=rf"cannot write {target}: No space left on device \(\d+\.\d+ GB free on "):
        io.write_json_atomic(target, {"id": "x"})
    monkeypatch.undo()
    assert list(tmp_path.rglob("*")) == [tmp_path / "smoke"]  # no .base.json.gz.<pid>.tmp left behind


def test_doctor_lists_stray_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    folder = cache.results_dir("smoke")
    folder.mkdir(parents=True)
    stray = folder / ".base.json.gz.4242.tmp"
    stray.write_bytes(b"partial")
    rows = [r for r in cache.check("smoke") if r["status"] == "temporary"]
    assert [r["name"] for r in rows] == [stray.name] and f"rm {stray}" in rows[0]["why"]


def test_temporary_files_are_ignored_by_git():
    ignore = (cache.REPO / ".gitignore").read_text().split()
    assert "*.tmp" in ignore
