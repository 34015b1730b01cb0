"""Issue 27 #12: the command line's edge cases end in one line that names the value, before any model loads."""
import pytest
import torch

from cfsam import cli
from cfsam.data import models
from cfsam.pipeline import cache


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_eval_with_no_tasks_is_an_error(no_loading, capsys):
    assert cli.main(["eval", "--model", "tiny", "--tasks", ""]) == 2
    assert "--tasks '' names no task" in _error(capsys)
    assert cli.main(["eval", "--model", "tiny", "--tasks", " , "]) == 2


def test_eval_on_a_missing_cuda_device_is_named(no_loading, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["eval", "--model", "tiny", "--tasks", "copa", "--device", "cuda:0"]) == 2
    assert "--device 'cuda:0': this machine has no CUDA device; allowed: cpu" in _error(capsys)
    assert cli.main(["eval", "--model", "tiny", "--tasks", "copa", "--device", "gpu7"]) == 2
    assert "--device 'gpu7' is not a device name" in _error(capsys)


def test_the_packages_errors_are_one_line_and_a_bug_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    from cfsam.core.errors import UnknownName

    def raises(err):
        def broken(*a, **k):
            raise err
        return broken

    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    monkeypatch.setattr(cache, "check", raises(UnknownName("unknown task 'x'; allowed: copa")))
    assert cli.main(["status", "--preset", "smoke"]) == 2
    assert _error(capsys).endswith("error: unknown task 'x'; allowed: copa")  # not KeyError's quoted repr
    for bug in (KeyError("stage_id"), RuntimeError("boom"), ValueError("not one of ours")):
        monkeypatch.setattr(cache, "check", raises(bug))  # not a CfsamError: a bug, not the user's input
        with pytest.raises(type(bug)):
            cli.main(["status", "--preset", "smoke"])


def test_a_yaml_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nsizes: [tiny\ntrain: {}\n")
    assert cli.main(["status", "--preset", str(bad)]) == 2
    assert f"preset file {bad} is not valid YAML" in _error(capsys)
