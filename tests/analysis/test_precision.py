"""Does bf16 change the numbers (analysis/precision.py)? Synthetic entries whose differences are known by hand."""
import pytest
import yaml

from cfsam.analysis import precision
from cfsam.core.io import write_json_atomic
from cfsam.pipeline import cache, presets, specs


def _entry(exp, name, losses, correct):
    """Held-out examples of 10 tokens at the given per-example losses on every set; eval items right or wrong."""
    sets = exp["measure"]["heldout"]["datasets"]
    task = exp["measure"]["eval"]["tasks"][0]
    return {"id": specs.experiment_id(exp), "name": name, "spec": exp, "provenance": {"data": cache.data_hashes(exp)},
            "heldout_loss": {d: {"loss": sum(losses) / len(losses), "n": len(losses),
                                 "per_example": [[10 * v, 10] for v in losses]} for d in sets},
            "eval": {"tasks": {task: {"status": "ok", "primary": "acc", "records": [
                {"idx": i, "acc": float(c), "gold_choice_logprob": -1.0} for i, c in enumerate(correct)]}}}}


@pytest.fixture
def preset(smoke_variant):
    def edit(p):
        p["frontier"]["seeds"] = [1234, 1235]
        p["frontier"]["precision_check"] = {"runs": ["adamw-lr0.001"], "precision": "bf16"}

    return smoke_variant("smoke-bf16", edit)


def test_bf16_against_fp32_paired_and_beside_a_second_seed(preset, tmp_path):
    exps = specs.expand(preset)
    assert exps["open-platypus-adamw-lr0.001-bf16-s1234"]["run"]["precision"] == "bf16"
    assert "auto-wiki-adamw-lr0.001-bf16-s1234" not in exps  # the headline set only (frontier.full)
    root = tmp_path / "results" / "smoke-bf16"

    def put(name, losses, correct):
        write_json_atomic(root / f"{name}.json", _entry(exps[name], name, losses, correct))

    put("open-platypus-adamw-lr0.001-s1234-4of4", [1.0, 2.0, 3.0, 4.0], [1, 0, 1, 0])
    put("open-platypus-adamw-lr0.001-bf16-s1234", [1.1, 2.1, 3.1, 4.1], [1, 0, 1, 0])  # every example +0.1
    put("open-platypus-adamw-lr0.001-s1235-4of4", [1.5, 2.5, 3.5, 4.5], [1, 1, 1, 1])  # the seed moves it more
    t = precision.check(preset, n_boot=50).set_index("measure")
    assert t["Δ"].to_dict() == pytest.approx({"held-out loss: alpaca": 0.1, "held-out loss: open-platypus": 0.1,
                                              "eval: copa": 0.0})
    held = t.loc["held-out loss: alpaca"]
    assert held["low"] == pytest.approx(0.1) and held["high"] == pytest.approx(0.1)  # the same shift on every example
    assert held["reference"] == pytest.approx(2.5) and held["second seed's Δ"] == pytest.approx(0.5)
    assert t.loc["eval: copa", "second seed's Δ"] == pytest.approx(0.5)
    said = precision.sentence(t.reset_index(), preset)
    assert "held-out losses moved by +0.1000 [+0.1000, +0.1000] (alpaca)" in said
    assert "2 of 3 measures moved beyond their interval's zero, and 0 by more than a second training seed" in said


def test_an_uncomputed_check_names_its_command_and_a_bad_precision_is_refused(preset, tmp_path):
    assert "--only open-platypus-adamw-lr0.001-bf16-s1234" in precision.sentence(precision.check(preset), preset)
    p = yaml.safe_load(open(preset))
    p["frontier"]["precision_check"]["precision"] = "fp32"  # the runs' own precision: nothing to compare
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(p))
    with pytest.raises(presets.PresetError, match="precision_check.precision='fp32': allowed bf16, fp16"):
        presets.load_preset(str(bad))
