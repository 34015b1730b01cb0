"""The device self-check (scripts/offline_gpu), run here on CPU against the committed cpu entry of ``base``:
it passes there, fails on a perturbed copy naming what disagrees, and fails on the H200 entry that the
wrong EOS spoilt. And the cause itself: with <|im_start|> as EOS this CPU reproduces the H200 numbers."""
import copy
import gzip
import json

import pytest

from cfsam.data import models
from cfsam.measurement import heldout, selfcheck
from cfsam.pipeline.cache import REPO

CPU_BASE = REPO / "results" / "cpu" / "base.json.gz"
H200_BASE = REPO / "results" / "h200" / "base.json.gz"
SMALL = {"datasets": ["alpaca"], "tasks": ["copa"], "n_examples": 4, "n_items": 4}

mirror = pytest.mark.mirror  # the committed entries were measured on the mirror's data


@pytest.fixture(scope="module")
def reference():
    return selfcheck.read_reference(CPU_BASE, SMALL["datasets"], SMALL["tasks"])


@pytest.fixture(scope="module")
def measured(reference):
    return selfcheck.measure(reference, datasets=SMALL["datasets"], n_examples=SMALL["n_examples"],
                             tasks=SMALL["tasks"], n_items=SMALL["n_items"])


@mirror
def test_passes_against_the_committed_cpu_entry(measured, reference):
    result = selfcheck.compare(measured, reference)
    assert result["passed"], result["failures"]
    assert result["checks"]["heldout:alpaca"]["n"] == 4
    assert result["checks"]["eval:copa"]["n"] == 8  # two choices an item
    assert all(c["max_gap"] < 1e-4 for c in result["checks"].values())  # same machine kind: float noise


@mirror
def test_fails_on_a_perturbed_reference_naming_what_differs(measured, reference):
    bad = copy.deepcopy(reference)
    s, n = bad["heldout_loss"]["alpaca"]["per_example"][2]
    bad["heldout_loss"]["alpaca"]["per_example"][2] = [s + 2e-3 * n, n]  # 2e-3 a token: twice the tolerance
    rec = next(r for r in bad["eval"]["tasks"]["copa"]["records"] if r["idx"] == measured["eval"]["copa"][1]["idx"])
    rec["ll"][0] -= 2e-3 * rec["n_tokens"][0]
    result = selfcheck.compare(measured, bad)
    assert not result["passed"]
    assert [n for n, c in result["checks"].items() if not c["passed"]] == ["heldout:alpaca", "eval:copa"]
    assert len(result["failures"]) == 2
    assert result["failures"][0].startswith("held-out alpaca example 2: mean loss")
    assert f"copa item {rec['idx']} choice 0" in result["failures"][1]
    # just inside the tolerance passes
    ok = copy.deepcopy(reference)
    ok["heldout_loss"]["alpaca"]["per_example"][2] = [s + 0.5e-3 * n, n]
    assert selfcheck.compare(measured, ok)["passed"]


@mirror
def test_a_token_count_or_weights_mismatch_fails(measured, reference):
    bad = copy.deepcopy(reference)
    s, n = bad["heldout_loss"]["alpaca"]["per_example"][0]
    bad["heldout_loss"]["alpaca"]["per_example"][0] = [s, n + 1]
    bad["provenance"]["model_weights_hash"] = "0" * 16
    result = selfcheck.compare(measured, bad)
    assert not result["checks"]["weights"]["passed"] and not result["checks"]["heldout:alpaca"]["passed"]
    assert any(f"{n} response tokens here, {n + 1} in the reference" in f for f in result["failures"])


@mirror
def test_fails_against_the_h200_entry_on_held_out_losses_only(measured):
    h200 = selfcheck.read_reference(H200_BASE, SMALL["datasets"], SMALL["tasks"])
    result = selfcheck.compare(measured, h200)
    assert not result["checks"]["heldout:alpaca"]["passed"]
    assert result["checks"]["eval:copa"]["passed"]  # the eval log-likelihoods agreed across the machines
    assert result["checks"]["heldout:alpaca"]["max_gap"] > 0.05


@mirror
def test_the_wrong_eos_reproduces_the_h200_held_out_losses(tokenizer):
    """The cause (issue 26): with transformers 5.17's EOS, <|im_start|>, the CPU measures the H200's numbers."""
    wrong = copy.deepcopy(tokenizer)
    wrong.eos_token = "<|im_start|>"
    assert wrong.eos_token_id == 1
    net = models.load_model("smollm2-135m").model.eval()
    h = json.load(gzip.open(H200_BASE))
    batches = heldout.heldout_batches("alpaca", wrong, n_examples=4, batch_size=8, max_length=256, seed=1234)
    got = heldout.per_example_losses(net, batches)
    want = h["heldout_loss"]["alpaca"]["per_example"][:4]
    assert [n for _, n in got] == [n for _, n in want]
    assert [s / n for s, n in got] == pytest.approx([s / n for s, n in want], abs=1e-3)


@mirror
def test_the_command_writes_the_result_and_fails_with_a_message(tmp_path, capsys, reference):
    bad = copy.deepcopy(reference)
    for row in bad["heldout_loss"]["alpaca"]["per_example"]:
        row[0] += 9.0  # what the wrong EOS did: about 9 nats an example
    path = tmp_path / "bad.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(bad, f)
    out = tmp_path / "check.json"
    rc = selfcheck.main([str(path), "--out", str(out), "--datasets", "alpaca", "--n-examples", "2",
                         "--tasks", "copa", "--n-items", "2"])
    text = capsys.readouterr().out
    assert rc == 1
    assert text.startswith("device self-check FAILED on cpu") and "failing: heldout:alpaca" in text
    assert "held-out alpaca example 0: mean loss" in text
    assert json.loads(out.read_text())["passed"] is False


def test_a_reference_without_the_sets_says_what_it_holds(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"id": "x", "spec": {"run": {"model": "m"}}, "heldout_loss": {"alpaca": {}},
                                "eval": {"tasks": {}}}))
    with pytest.raises(ValueError, match=r"lacks heldout_loss.alpaca.per_example, eval.tasks.copa.records; "
                                         r"it holds held-out sets alpaca and tasks none"):
        selfcheck.read_reference(path, ["alpaca"], ["copa"])
    assert selfcheck.main([str(path), "--datasets", "alpaca", "--tasks", "copa"]) == 2


# ------------------------------------------------------------------------- the runner's side
def test_the_runner_records_the_check_and_refuses_a_failed_one(tmp_path, monkeypatch):
    from cfsam.core.io import write_json_atomic
    from cfsam.pipeline import runner

    monkeypatch.delenv("CFSAM_DEVICE_CHECK", raising=False)
    assert runner.device_check() == {}
    good = {"passed": True, "tol": 1e-3, "checks": {"heldout:alpaca": {"n": 8, "max_gap": 2e-5, "passed": True}},
            "failures": []}
    write_json_atomic(tmp_path / "check.json", good)
    monkeypatch.setenv("CFSAM_DEVICE_CHECK", str(tmp_path / "check.json"))
    assert runner.device_check() == {"device_check": good}
    assert runner.provenance(0.0, 1.0, {"run": {"model": "tiny"}, "measure": {}})["device_check"] == good
    write_json_atomic(tmp_path / "check.json", {**good, "passed": False, "failures": ["held-out alpaca example 0: x"]})
    with pytest.raises(RuntimeError, match=r"self-check in .*check.json failed \(held-out alpaca example 0: x\)"):
        runner.run_missing("smoke", dry_run=True)
    monkeypatch.setenv("CFSAM_DEVICE_CHECK", str(tmp_path / "absent.json"))
    with pytest.raises(RuntimeError, match="absent.json cannot be read"):
        runner.device_check()


def test_a_staged_copy_says_whether_its_tree_was_dirty(monkeypatch):
    from cfsam.pipeline import runner

    runner.code_version.cache_clear()
    try:
        monkeypatch.setenv("CFSAM_GIT_COMMIT", "a" * 40)
        monkeypatch.setenv("CFSAM_GIT_DIRTY", "1")
        assert runner.code_version() == {"git_commit": "a" * 40, "git_dirty": True, "git_from": "CFSAM_GIT_COMMIT"}
        runner.code_version.cache_clear()
        monkeypatch.setenv("CFSAM_GIT_DIRTY", "0")
        assert runner.code_version()["git_dirty"] is False
    finally:
        runner.code_version.cache_clear()
