import pytest

from cfsam.presets import PresetError, load_preset, preset_names


def test_all_presets_load_and_validate():
    assert {"smoke", "cpu", "paper"} <= set(preset_names())
    for name in preset_names():
        assert load_preset(name)["name"] == name


def test_paper_preset_holds_the_papers_hyper_parameters():
    p = load_preset("paper")  # Appendix A.2
    assert (p["stage1"]["epochs"], p["stage1"]["lr"], p["stage1"]["batch_size"]) == (3, 2e-5, 128)
    assert (p["stage2"]["lr"], p["stage2"]["batch_size"], p["stage2"]["rho"]) == (5e-6, 128, 2.0)
    assert (p["stage2"]["epochs_adamw"], p["stage2"]["epochs_sam"], p["seed"]) == (2, 1, 1234)


@pytest.mark.parametrize("overrides, message", [
    ({"modell": "x"}, "unknown preset key"),
    ({"model": "gpt5"}, "unknown model 'gpt5'; allowed: smollm2-135m"),
    ({"data.stage2": ["sharegpt", "wiki"]}, "unknown dataset 'wiki'"),
    ({"stage2.lr": -1.0}, "stage2.lr=-1.0 must be a positive number"),
    ({"stage2.batch_size": "8"}, "must be int"),
    ({"rehearsal.fraction": 1.5}, r"rehearsal.fraction=1.5 must lie in \[0, 1\)"),
    ({"wise_ft.alpha": 2}, "wise_ft.alpha"),
    ({"stage1.optimizer": "sgd"}, "allowed: adamw, sam"),
    ({"landscape.grid": 2}, "landscape.grid=2"),
])
def test_bad_presets_are_named(overrides, message):
    with pytest.raises(PresetError, match=message):
        load_preset("smoke", overrides)


def test_unknown_preset_and_malformed_file(tmp_path):
    with pytest.raises(PresetError, match="unknown preset 'gpu'; allowed: cpu, paper, smoke"):
        load_preset("gpu")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(PresetError, match="not valid YAML"):
        load_preset(bad)
