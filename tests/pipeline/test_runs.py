"""Runs as one tagged type (pipeline/runs.py): each kind of the smoke preset's experiments, read from its
dict form once, against what that dict says by hand."""
from cfsam.pipeline import runs, specs
from cfsam.training import config as train_config


def test_each_kind_answers_for_itself():
    exps = specs.expand("smoke")
    base = runs.parse(exps["base"]["run"])
    assert isinstance(base, runs.Base) and base.id() == exps["base"]["run"]["model"]
    assert list(base.stages()) == [] and base.last_stage() is None and base.parents() == []

    s2 = exps["s2-open-platypus-adamw"]["run"]  # a stage 2 from its stage 1
    r = runs.parse(s2)
    assert isinstance(r, runs.Stage) and r.parents() == [s2["model"]]
    assert [train_config.run_id(s) for s in r.stages()] == [train_config.run_id(s2), train_config.run_id(s2["model"])]
    assert r.base_model() == s2["model"]["model"] == base.model

    snap = exps["open-platypus-adamw-lr0.001-s1234-2of4"]["run"]
    r = runs.parse(snap)
    assert isinstance(r, runs.Snapshot) and (r.at, r.of) == (2, 4) and r.run == snap["snapshot"]["run"]
    assert r.canonical() == {"run": train_config.run_id(snap["snapshot"]["run"]), "at": 2, "of": 4}
    assert r.last_stage() == train_config.resolve(snap["snapshot"]["run"])

    w = exps["wiseft-open-platypus-adamw"]["run"]
    r = runs.parse(w)
    assert isinstance(r, runs.WiseFT) and r.alpha == w["wise_ft"]["alpha"]
    assert r.parents() == [w["wise_ft"]["stage1"], w["wise_ft"]["stage2"]]
    assert r.id() == train_config.merge_id({"run": train_config.run_id(w["wise_ft"]["stage1"])},
                                           {"run": train_config.run_id(w["wise_ft"]["stage2"])}, r.alpha)
    assert r.last_stage() == train_config.resolve(w["wise_ft"]["stage2"])  # the tuned side
    assert r.base_model() == base.model
