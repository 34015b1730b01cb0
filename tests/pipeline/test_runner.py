"""run-missing under a multi-process launcher, kills and a second process: on the tiny model of `smoke`."""
import json
import os
import subprocess
import sys

import pytest

from cfsam.pipeline import cache, specs

pytestmark = [pytest.mark.mirror, pytest.mark.slow]


def _env(tmp_path, **extra):
    return dict(os.environ, CFSAM_RESULTS=str(tmp_path / "results"), CFSAM_CACHE=str(tmp_path / "cache"),
                OMP_NUM_THREADS="1", **extra)


def test_run_missing_under_torchrun_keeps_the_ranks_in_step(tmp_path):
    """It used to deadlock (rank 0 held the run's lock while waiting in init_process_group for rank 1, which
    waited on the lock), or to fail with `--only base,stage1` (rank 0 measured base while rank 1 trained)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cfsam", "run-missing", "--preset", "smoke", "--only", "base,stage1"],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("base", "stage1"):
        entry = json.loads((tmp_path / "results" / "smoke" / f"{name}.json").read_text())
        assert entry["id"] == specs.experiment_id(specs.expand("smoke")[name])
    stage1 = json.loads((tmp_path / "results" / "smoke" / "stage1.json").read_text())
    assert stage1["train"]["world_size"] == 2 and stage1["train"]["dist"] == "ddp"
    # both ranks measured together (the eval items shared), rank 0 wrote: its log says so once per experiment
    assert proc.stderr.count("measuring") == 2


def test_a_moved_cache_keeps_its_runs(tmp_path, monkeypatch):
    """Stage-2 ids used to hash the parent's absolute path: a copied cache retrained everything."""
    import shutil

    from cfsam.pipeline import runner

    monkeypatch.setenv("CFSAM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path / "results"))
    run = specs.expand("smoke")["s2-auto-wiki-adamw"]["run"]
    out_a, _ = runner.materialize(run)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    monkeypatch.setenv("CFSAM_CACHE", str(tmp_path / "b"))
    stamp = {p: p.stat().st_mtime for p in (tmp_path / "b" / "runs").rglob("metrics.json")}
    out_b, metrics = runner.materialize(run)
    assert out_b == out_a.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert {p: p.stat().st_mtime for p in (tmp_path / "b" / "runs").rglob("metrics.json")} == stamp  # nothing retrained


def test_a_second_process_finds_the_work_done_and_does_not_measure_again(tmp_path, monkeypatch):
    """Two run-missing on one cache used to both measure every experiment: the lock on the entry is held
    while measuring, and whoever gets it second finds the entry current."""
    from cfsam.core.io import write_json_atomic
    from cfsam.pipeline import runner

    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("CFSAM_CACHE", str(tmp_path / "cache"))
    exp = specs.expand("smoke")["base"]
    write_json_atomic(tmp_path / "results" / "smoke" / "base.json",
                      {"id": specs.experiment_id(exp), "spec": exp, "provenance": {"data": cache.data_hashes(exp)}})

    def measured_twice(*args, **kwargs):
        raise AssertionError("measured an experiment another process had finished")

    monkeypatch.setattr(runner, "measure", measured_twice)
    assert runner.run_one("smoke", "base") is None
    assert not list((tmp_path / "results" / "smoke").glob("*.lock"))  # locks live in the cache
