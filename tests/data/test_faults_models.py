"""Issue 27 #1: a folder in the working directory named like a model preset never replaces the preset."""
import pytest
import torch

from cfsam.core.registry import RegistryError
from cfsam.data import models
from cfsam.training import config


@pytest.fixture
def shadow(tmp_path, monkeypatch):
    """A Trainer-style output folder ``tiny/`` in the working directory: other weights, another context."""
    loaded = models.load_model("tiny")
    reference = models.weights_hash(loaded.model)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.01)
    loaded.model.config.max_position_embeddings = 64
    loaded.model.save_pretrained(tmp_path / "tiny")
    loaded.tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    return reference, models.weights_hash(loaded.model)


def test_a_preset_name_loads_the_preset_not_the_folder_beside_it(shadow):
    reference, other = shadow
    assert reference != other
    assert models.weights_hash(models.load_model("tiny").model) == reference
    assert models.load_model("tiny").source == "random"
    # the folder, written as a path, is the folder
    assert models.weights_hash(models.load_model("./tiny").model) == other


def test_ids_and_checks_read_the_preset_too(shadow):
    assert config.model_ref("tiny") == "tiny"
    assert config.model_context("tiny") == 1024  # the preset's, not the folder's 64
    spec = {"model": "tiny", "dataset": "alpaca", "max_length": 128}
    config.resolve(spec)  # 128 > the folder's 64 would refuse it
    # the folder as a path is known by its weights, so it never reads as the preset's result
    assert config.model_ref("./tiny") != "tiny" and "weights" in config.model_ref("./tiny")
    short = {**spec, "max_length": 32}  # within the folder's context
    assert config.run_id({**short, "model": "./tiny"}) != config.run_id(short)


def test_a_bare_folder_name_must_be_written_as_a_path(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegistryError, match=r"unknown model preset 'mine'.*folder here is used as \./mine"):
        models.load_model("mine")
    with pytest.raises(config.SpecError, match=r"model='mine'.*\./mine"):
        config.resolve({"model": "mine", "dataset": "alpaca"})
    with pytest.raises(models.ModelUnavailable, match="model folder nowhere/x does not exist"):
        models.load_model("nowhere/x")
