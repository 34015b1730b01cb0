"""How the start was chosen (analysis/calibration.py): stage 1 at other lrs against the base model, on synthetic
entries whose differences are known by hand."""
import pytest
import yaml

from cfsam.analysis import calibration
from cfsam.core.io import write_json_atomic
from cfsam.pipeline import cache, presets, specs


def _entry(exp, name, losses, correct=(1, 0)):
    """Held-out examples of 10 tokens at the given per-example losses on every set measured."""
    sets = exp["measure"]["heldout"]["datasets"]
    tasks = exp["measure"]["eval"]["tasks"]
    return {"id": specs.experiment_id(exp), "name": name, "spec": exp, "provenance": {"data": cache.data_hashes(exp)},
            "heldout_loss": {d: {"loss": sum(losses) / len(losses), "n": len(losses),
                                 "per_example": [[10 * v, 10] for v in losses]} for d in sets},
            "eval": {"tasks": {t: {"status": "ok", "primary": "acc", "score": sum(correct) / len(correct), "records": [
                {"idx": i, "acc": float(c), "gold_choice_logprob": -1.0} for i, c in enumerate(correct)]}
                for t in tasks}}}


@pytest.fixture
def preset(smoke_variant):
    # the preset's own lr is frontier-stage1 itself
    return smoke_variant("smoke-cal", lambda p: p.update(calibration={"stage1_lr": [1.0e-5, p["stage1"]["lr"]]}))


def test_each_stage1_lr_against_the_base_model(preset, tmp_path):
    exps = specs.expand(preset)
    cal = [n for n, e in exps.items() if e.get("group") == "calibration"]
    assert cal == ["frontier-stage1-lr1e-05"]  # not the preset's own lr again
    assert exps[cal[0]]["run"] == {**exps["frontier-stage1"]["run"], "lr": 1.0e-5}
    assert exps[cal[0]]["measure"] == exps["frontier-stage1"]["measure"]
    root = tmp_path / "results" / "smoke-cal"
    write_json_atomic(root / "base.json", _entry(exps["base"], "base", [2.0, 3.0, 4.0]))
    # the preset's lr unlearned: every example +0.5; lr 1e-5 learned: every example -0.2
    write_json_atomic(root / "frontier-stage1.json", _entry(exps["frontier-stage1"], "frontier-stage1", [2.5, 3.5, 4.5]))
    write_json_atomic(root / f"{cal[0]}.json", _entry(exps[cal[0]], cal[0], [1.8, 2.8, 3.8], (1, 1)))
    t = calibration.stage1(preset, n_boot=50)
    s1 = yaml.safe_load(open(preset))["stage1"]["lr"]
    assert t.loc[1e-5, "learned alpaca"] == pytest.approx(0.2) and t.loc[s1, "learned alpaca"] == pytest.approx(-0.5)
    assert (t.loc[1e-5, "low"], t.loc[1e-5, "high"]) == pytest.approx((0.2, 0.2))  # the same fall on every example
    assert t.loc[1e-5, "eval accuracy"] == 1.0 and t.loc[s1, "chosen"] and not t.loc[1e-5, "chosen"]
    said = calibration.sentence(t)
    assert "at lr 1e-05 stage 1 learned alpaca +0.200 nats [+0.200, +0.200] (clearly)" in said
    assert "learned alpaca -0.500 nats [-0.500, -0.500] (not clearly; its held-out loss rose)" in said
    assert "which did not learn its set clearly" in said


def test_a_bad_calibration_lr_is_refused(preset, tmp_path):
    p = yaml.safe_load(open(preset))
    p["calibration"]["stage1_lr"] = [0.0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(p))
    with pytest.raises(presets.PresetError, match=r"calibration.stage1_lr\[0\]=0.0 must be a finite number > 0"):
        presets.load_preset(str(bad))
