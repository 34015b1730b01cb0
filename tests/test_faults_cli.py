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


def test_a_key_error_prints_without_quotes(monkeypatch, tmp_path, capsys):
    def broken(*a, **k):
        raise KeyError("stage_id is missing from the checkpoint")

    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    monkeypatch.setattr(cache, "check", broken)
    assert cli.main(["status", "--preset", "smoke"]) == 2
    assert _error(capsys).endswith("error: stage_id is missing from the checkpoint")


def test_a_yaml_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nsizes: [tiny\ntrain: {}\n")
    assert cli.main(["status", "--preset", str(bad)]) == 2
    assert f"preset file {bad} is not valid YAML" in _error(capsys)
