"""Wise-FT against a hand computation in float64."""
import json

import numpy as np
import pytest
import torch

from cfsam.data import models
from cfsam.training.merge import interpolate, wise_ft


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    dirs = []
    for seed in (1, 2):
        loaded = models.load_model("tiny")
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        d = root / f"stage{seed}"
        loaded.model.save_pretrained(d)
        loaded.tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs


def test_wise_ft_matches_hand_computation(two_stages, tmp_path):
    s1, s2 = two_stages
    alpha = 0.3
    out = wise_ft(s1, s2, tmp_path / "merged", alpha=alpha)
    w1, w2 = models.load_model(str(s1)).model.state_dict(), models.load_model(str(s2)).model.state_dict()
    merged = models.load_model(str(out)).model.state_dict()
    assert merged.keys() == w1.keys()
    for k in w1:
        hand = (1 - alpha) * w1[k].double().numpy() + alpha * w2[k].double().numpy()
        assert np.allclose(merged[k].double().numpy(), hand, rtol=0, atol=1e-6), k
        assert not torch.equal(merged[k], w1[k]) and not torch.equal(merged[k], w2[k])
    record = json.loads((out / "merge.json").read_text())
    assert record["alpha"] == alpha and record["weights_hash"] == models.weights_hash(models.load_model(str(out)).model)


def test_alpha_ends_are_the_stages_and_the_merge_is_cached(two_stages, tmp_path):
    s1, s2 = two_stages
    for alpha, src in ((0.0, s1), (1.0, s2)):
        out = wise_ft(s1, s2, tmp_path / f"a{alpha}", alpha=alpha)
        assert models.weights_hash(models.load_model(str(out)).model) == models.weights_hash(
            models.load_model(str(src)).model)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    wise_ft(s1, s2, out, alpha=1.0)  # the same merge: returned, not rewritten
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="another merge"):
        wise_ft(s1, s2, out, alpha=0.5)


def test_bad_inputs_are_named(two_stages, tmp_path):
    s1, s2 = two_stages
    with pytest.raises(ValueError, match="alpha=1.5"):
        wise_ft(s1, s2, tmp_path / "m", alpha=1.5)
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        wise_ft(s1, tmp_path / "nothing", tmp_path / "m")
    with pytest.raises(ValueError, match="shape"):
        interpolate({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)
