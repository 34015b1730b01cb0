"""run-missing computes what it can: an experiment whose data or model cannot be had here is skipped with one
line, one that fails does not stop the others, and a summary ends it (issue 28; issue 27 #9)."""
import pytest

from cfsam import cli
from cfsam.data import formatting, hub, sources
from cfsam.pipeline import runner

# base measures the held-out loss of every stage-2 set, auto-wiki's too: it cannot be computed without it
ONLY = ["s2-open-platypus-sam", "s2-auto-wiki-adamw", "s2-open-platypus-adamw", "base"]


@pytest.fixture
def fake_runs(tmp_path, monkeypatch):
    """run_one records what it would compute (nothing trains); s2-open-platypus-sam fails as a broken
    experiment does; auto-wiki is a set that cannot be had here."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path / "results"))
    ran = []

    def run_one(preset, name, exp=None):
        ran.append(name)
        if name == "s2-open-platypus-sam":
            raise ValueError("a broken experiment")

    real = formatting.load_records

    def load_records(name, split="train"):
        if name == "auto-wiki":
            raise sources.DataUnavailable("dataset 'auto-wiki': cannot read GEM/wiki_auto_asset_turk:train here")
        return real(name, split)

    monkeypatch.setattr(runner, "run_one", run_one)
    monkeypatch.setattr(formatting, "load_records", load_records)
    return ran


def test_it_skips_what_cannot_be_had_runs_past_a_failure_and_sums_up(fake_runs, capsys):
    summary = runner.compute_missing("smoke", only=ONLY)
    assert fake_runs == ["s2-open-platypus-sam", "s2-open-platypus-adamw"]  # past the failure; none without its data
    assert summary.computed == ["s2-open-platypus-adamw"] and summary.current == []
    assert list(summary.unreachable) == ["s2-auto-wiki-adamw", "base"]
    assert all("GEM/wiki_auto" in why for why in summary.unreachable.values())
    assert summary.failed == {"s2-open-platypus-sam": "ValueError: a broken experiment"}
    out = capsys.readouterr().out
    assert out.count("skipped s2-auto-wiki-adamw: not computable here: dataset 'auto-wiki'") == 1
    assert out.count("skipped base: not computable here") == 1
    with pytest.raises(RuntimeError, match="1 experiment.*failed.*s2-open-platypus-sam"):  # the library call raises
        runner.run_missing("smoke", only=ONLY)


def test_the_command_exits_0_unless_something_failed_that_should_have_worked(fake_runs, capsys):
    assert cli.main(["run-missing", "--preset", "smoke", "--only", ",".join(ONLY)]) == 1  # one failed
    out = capsys.readouterr().out
    assert "computed 1, already current 0, not computable here 2, failed 1" in out
    assert "cfsam run-missing --preset smoke --only s2-auto-wiki-adamw,base" in out  # one line per reason
    assert "FAILED s2-open-platypus-sam: ValueError: a broken experiment" in out
    assert cli.main(["run-missing", "--preset", "smoke", "--only", "base,s2-open-platypus-adamw"]) == 0  # skips only
    assert "computed 1, already current 0, not computable here 1, failed 0" in capsys.readouterr().out


def test_without_mirror_or_network_nothing_is_computed_and_it_exits_0(tmp_path, monkeypatch, capsys):
    """A newcomer's clone: no mirror, no network. It used to stop at the first experiment (exit 2)."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path / "results"))
    for var in ("CFSAM_DATA_DIR", "CFSAM_DATA_SOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_no_network", lambda: "no network: huggingface.co cannot be reached (test)")
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("tried to compute without the data"))
    assert cli.main(["run-missing", "--preset", "smoke", "--only", ",".join(ONLY)]) == 0
    out = capsys.readouterr().out
    assert "computed 0, already current 0, not computable here 4, failed 0" in out
    assert out.count("skipped ") == 4 and "set CFSAM_DATA_DIR to a local data mirror" in out
    assert runner.unreachable({"run": {"model": "tiny"}, "measure": {}}) is None  # the tiny model needs no network
    # an experiment that reads no training set still waits for eval sets it cannot read here (an entry of
    # missing tasks would read as current); a set without a Hub copy is missing by design, anywhere
    screen = {"run": {"model": "tiny"}, "measure": {"eval": {"tasks": ["copa"]}}}
    assert "aps/super_glue" in runner.unreachable(screen)
    assert runner.unreachable({"run": {"model": "tiny"}, "measure": {"eval": {"tasks": ["csl_dev"]}}}) is None
