"""Issue 27 #11: a damaged model in the run cache is computed again, never reused, and its message says how."""
import json
from pathlib import Path

import pytest

from cfsam.data import models
from cfsam.pipeline import runner, specs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private run cache that shares the converted models (the tiny model's tokenizer) with the real one."""
    root = tmp_path_factory.mktemp("cache")
    real = models.cache_dir() / "models"
    (root / "models").symlink_to(real.resolve())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CFSAM_CACHE", str(root))
        yield root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_stage_model_is_trained_again(cache):
    run = specs.expand("smoke")["stage1"]["run"]
    out, first = runner.materialize(run)
    _truncate(Path(out) / "model.safetensors")
    with pytest.raises(models.DamagedModelFile, match=rf"model.safetensors is damaged.*`rm -r {out}`"):
        models.load_model(out)
    again, metrics = runner.materialize(run)
    assert again == out and metrics["resumed_from_step"] is None  # trained, not reused
    assert models.weights_hash(models.load_model(out).model) == first["weights_hash"] == metrics["weights_hash"]


def test_a_damaged_snapshot_is_saved_again_by_training_its_stage(cache):
    exps = specs.expand("smoke")
    name = next(n for n in exps if n.endswith("-2of4"))
    out, _ = runner.materialize(exps[name]["run"])
    marker = json.loads((Path(out) / "snapshot.json").read_text())
    (Path(out) / "tokenizer.json").write_text("{not json")
    with pytest.raises(models.DamagedModelFile, match=rf"tokenizer.json is damaged.*`rm -r {Path(out).parent}`"):
        models.load_model(out)
    again, _ = runner.materialize(exps[name]["run"])
    assert again == out
    assert models.weights_hash(models.load_model(out).model) == marker["weights_hash"]
