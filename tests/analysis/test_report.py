"""The paper's size table (2b) beside ours: one block per model size, each Delta within its own model."""
import numpy as np
import pytest

from cfsam.analysis import report
from cfsam.core.io import write_json_atomic
from cfsam.pipeline import cache, specs


def _scored(exp, name, avg):
    """An entry whose every category scores ``avg`` (a fraction; synthetic, never a result)."""
    cats = {c: {"score": avg} for c in report.CATEGORIES}
    return {"id": specs.experiment_id(exp), "name": name, "spec": exp, "provenance": {"data": cache.data_hashes(exp)},
            "eval": {"categories": cats, "tasks": {}}}


def test_sizes_table_has_one_block_per_model_with_its_own_delta(tmp_path, monkeypatch):
    """cpu lists SmolLM2 (its model) and Gemma 3 as sizes. SmolLM2: Alpaca 30 %, w/o SAM 28 %, w/ SAM 29 %
    -> Delta -2 and +1; Gemma: 40 %, 35 %, 38 % -> -5 and +3. A block mixing the models would give other
    numbers (Gemma's w/o row against SmolLM2's Alpaca: +5)."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    exps = specs.expand("cpu")
    scores = {"stage1": 0.30, "s2-open-platypus-adamw": 0.28, "s2-open-platypus-sam": 0.29,
              "gemma3-270m/stage1": 0.40, "gemma3-270m/s2-open-platypus-adamw": 0.35,
              "gemma3-270m/s2-open-platypus-sam": 0.38}
    for name, avg in scores.items():
        write_json_atomic(tmp_path / "cpu" / f"{name}.json", _scored(exps[name], name, avg))
    names = list(scores) + ["base", "gemma3-270m/base"]
    t = report.compare_sizes("cpu", "2b", names)
    rows = {label: row for label, row in t.iterrows()}
    assert rows["smollm2-135m: Alpaca"][("AVG", "ours")] == pytest.approx(30.0)
    assert rows["smollm2-135m: -> Open-Platypus (w/o SAM, 2 ep)"][("Delta", "ours")] == pytest.approx(-2.0)
    assert rows["smollm2-135m: -> Open-Platypus (w/ SAM, 1 ep)"][("Delta", "ours")] == pytest.approx(1.0)
    assert rows["gemma3-270m: Alpaca"][("AVG", "ours")] == pytest.approx(40.0)
    assert rows["gemma3-270m: -> Open-Platypus (w/o SAM, 2 ep)"][("Delta", "ours")] == pytest.approx(-5.0)
    assert rows["gemma3-270m: -> Open-Platypus (w/ SAM, 1 ep)"][("Delta", "ours")] == pytest.approx(3.0)
    assert rows["gemma3-270m: Alpaca"][("", "experiment")] == "gemma3-270m/stage1"
    # the paper's llama2-7b rows are beside both blocks, the same in each
    assert rows["gemma3-270m: Alpaca"][("AVG", "paper")] == rows["smollm2-135m: Alpaca"][("AVG", "paper")]
    assert not np.isnan(rows["smollm2-135m: Alpaca"][("AVG", "paper")])


def test_the_size_tables_say_which_recipe_each_model_trains_with():
    """The sentence under Tables 2(b) and 6 gives each model's lrs and precision as its presets' YAML has them
    (read here directly), and flags a comparison whose models were not tuned alike; one model says nothing."""
    import yaml

    from cfsam.analysis import book
    from cfsam.pipeline import presets

    gemma = yaml.safe_load(presets.registered_file("cpu-gemma").read_text())
    cpu = yaml.safe_load(presets.registered_file("cpu").read_text())
    s = book.recipes_sentence("cpu")
    assert (f"smollm2-135m with this preset's recipe (stage 1 at lr {cpu['stage1']['lr']:g}, stage 2 at "
            f"{cpu['stage2']['lr']:g}, fp32)") in s
    assert (f"gemma3-270m with the `cpu-gemma` preset's recipe (stage 1 at lr {gemma['stage1']['lr']:g}, stage 2 at "
            f"{gemma['stage2']['lr']:g}, {gemma['train']['precision']})") in s
    assert "within one model and one recipe" in s
    assert book.recipes_sentence("paper").endswith("one recipe for every size, as the paper's.")
    assert book.recipes_sentence("smoke") == ""


def test_the_first_page_names_the_second_model_above_its_verdicts():
    """The intro's second block: the other preset's model and description as its YAML has them, then that
    preset's own verdicts (one line per claim, or the sentence that none is computed yet)."""
    import yaml

    from cfsam.analysis import book, verdicts
    from cfsam.pipeline import presets

    raw = yaml.safe_load(presets.registered_file("smoke").read_text())
    head, body = book.other_findings("smoke").split("\n\n", 1)
    assert head.startswith(f"**On a second model**, `{raw['model']}` (the `smoke` preset: {raw['description']};")
    assert body == book.findings(verdicts.claim_verdicts("smoke"))
    assert "{doc}" not in head  # CommonMark output: a MyST role would print as text


def test_a_second_sizes_runs_are_measured_against_its_own_stage1():
    """Learning and forgetting of cpu's Gemma rows against Gemma's stage 1, not SmolLM2's: recomputed here from
    the committed entries' held-out losses, read from the files themselves."""
    import gzip
    import json

    import pytest as _pytest

    from cfsam.analysis import report
    from cfsam.pipeline.cache import results_dir

    d = results_dir("cpu")
    name = "gemma3-270m/s2-open-platypus-adamw"
    if not (d / f"{name}.json.gz").exists():
        _pytest.skip("cpu's Gemma rows are not committed")
    read = lambda n: json.loads(gzip.open(d / f"{n}.json.gz").read())["heldout_loss"]  # noqa: E731
    run, own = read(name), read("gemma3-270m/stage1")
    lf = report.learning_and_forgetting("cpu", ["stage1", "gemma3-270m/stage1", name])
    row = lf.loc[name]
    assert row["forgot (Δ Alpaca held-out loss)"] == _pytest.approx(run["alpaca"]["loss"] - own["alpaca"]["loss"])
    assert row["learned (Δ own held-out loss)"] == _pytest.approx(run["open-platypus"]["loss"] - own["open-platypus"]["loss"])
