"""run-missing under a multi-process launcher, kills and a second process: on the tiny model of `smoke`."""
import json
import os
import re
import subprocess
import sys

import pytest

from cfsam.core.io import read_json
from cfsam.pipeline import cache, specs

pytestmark = pytest.mark.slow


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
        entry = read_json(tmp_path / "results" / "smoke" / f"{name}.json.gz")
        assert entry["id"] == specs.experiment_id(specs.expand("smoke")[name])
    stage1 = read_json(tmp_path / "results" / "smoke" / "stage1.json.gz")
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


def test_groups_keep_a_run_and_its_measurements_together():
    """One worker per training run: its snapshots and the Wise-FT merges of its tuned side go together,
    groups and members in the order run-missing would take them."""
    from cfsam.pipeline import runner

    exps = specs.expand("smoke")
    names = [n for n, e in exps.items() if e.get("group") == "frontier"]
    got = runner.groups(exps, names)
    assert sorted(n for g in got for n in g) == sorted(names)
    firsts = [names.index(g[0]) for g in got]
    assert firsts == sorted(firsts) and all([names.index(n) for n in g] == sorted(names.index(n) for n in g)
                                            for g in got)
    wise = next(g for g in got if "open-platypus-wiseft-a0.5-s1234" in g)  # merged from the reference run
    assert specs.last_stage(exps[wise[0]]["run"]) == specs.last_stage(exps["open-platypus-wiseft-a0.5-s1234"]["run"])
    for g in got:
        stages = {specs.run_id(specs.last_stage(exps[n]["run"])) if specs.last_stage(exps[n]["run"]) else "base"
                  for n in g}
        assert len(stages) == 1, g
    snaps = next(g for g in got if "open-platypus-adamw-lr0.001-s1234-1of4" in g)
    assert snaps[:4] == [f"open-platypus-adamw-lr0.001-s1234-{k}of4" for k in range(1, 5)]


def test_run_missing_takes_the_experiments_of_one_training_run_together(tmp_path, monkeypatch):
    """The paper-table run that is a frontier run's end (AdamW, 1 epoch) is measured beside that run's
    snapshots, not after every other experiment: its training is shared while the cache lives."""
    from cfsam.pipeline import runner

    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))  # empty: everything is missing
    only = ["open-platypus-adamw-lr0.001-s1234-1of4", "s2-open-platypus-adamw", "s2-open-platypus-adamw-e1",
            "open-platypus-adamw-lr0.001-s1234-2of4"]
    exps = specs.expand("smoke")
    assert specs.run_id(specs.last_stage(exps[only[2]]["run"])) == specs.run_id(specs.last_stage(exps[only[0]]["run"]))
    assert runner.run_missing("smoke", only=only, dry_run=True) == [only[0], only[2], only[3], only[1]]


def test_workers_compute_the_same_entries_and_train_shared_runs_once(tmp_path):
    """Two workers on two groups that both need stage 1: stage 1 is trained once (the second worker waits on
    its lock), and every entry is the spec's."""
    only = ["frontier-stage1", "open-platypus-sam-rho2-s1234-4of4"]
    proc = subprocess.run([sys.executable, "-m", "cfsam", "run-missing", "--preset", "smoke", "--workers", "2",
                           "--only", ",".join(only)], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exps = specs.expand("smoke")
    for name in only:
        entry = read_json(tmp_path / "results" / "smoke" / f"{name}.json.gz")
        assert entry["id"] == specs.experiment_id(exps[name])
    finished = re.findall(r"stage (\w+) finished:", proc.stderr)  # the trainer's last line for each stage
    assert sorted(finished) == sorted(set(finished)) and len(finished) == 2, finished  # stage 1 + one stage 2
    assert specs.run_id(exps["frontier-stage1"]["run"]) in finished


def test_workers_must_be_positive():
    from cfsam.pipeline import runner

    with pytest.raises(ValueError, match="workers=0"):
        runner.run_missing("smoke", workers=0)


def test_a_staged_copy_is_credited_to_the_commit_its_sender_names(monkeypatch):
    """An accelerator's copy of the tree carried the session's older .git: its entries named that commit, dirty.
    The launcher's CFSAM_GIT_COMMIT now wins; without it, git says."""
    from cfsam.pipeline import runner

    runner.code_version.cache_clear()
    monkeypatch.delenv("CFSAM_GIT_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cache.REPO, capture_output=True, text=True).stdout.strip()
    assert runner.code_version()["git_commit"] == head
    runner.code_version.cache_clear()
    monkeypatch.setenv("CFSAM_GIT_COMMIT", "0" * 40)
    assert runner.code_version() == {"git_commit": "0" * 40, "git_dirty": False, "git_from": "CFSAM_GIT_COMMIT"}
    runner.code_version.cache_clear()


def test_a_preset_edited_while_it_runs_neither_stops_it_nor_changes_its_specs(tmp_path, monkeypatch):
    """A running run-missing re-read the preset file before each experiment: a key added to it meanwhile (by a
    newer checkout) stopped the run with 'unknown preset key'. It now checks each entry against the spec
    it started with."""
    from cfsam.core.io import write_json_atomic
    from cfsam.pipeline import runner

    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("CFSAM_CACHE", str(tmp_path / "cache"))
    exp = specs.expand("smoke")["base"]
    write_json_atomic(cache.entry_path("smoke", "base"),
                      {"id": specs.experiment_id(exp), "spec": exp, "provenance": {"data": cache.data_hashes(exp)}})

    def edited(*args, **kwargs):
        raise ValueError("unknown preset key(s) frontier.new_key")

    monkeypatch.setattr(runner, "expand", edited)
    monkeypatch.setattr(cache, "expand", edited)
    monkeypatch.setattr(runner, "measure", lambda *a, **k: pytest.fail("measured a current entry"))
    assert runner.run_one("smoke", "base", exp) is None
