"""Issue 27 #4, #7, #13: damaged, foreign and hostile checkpoints are named with the command that removes them,
and reading one runs no code from it."""
import os
import pickle
import shutil

import pytest
from safetensors.torch import load_file

from cfsam.training.checkpoint import DamagedCheckpoint
from cfsam.training.config import run_id
from cfsam.training.stage import train_stage

# 8 examples, batch 4, 1 epoch: 2 steps, a checkpoint after step 1
KW = dict(optimizer="adamw", lr=1e-3, epochs=1, batch_size=4, grad_accum=1, max_length=64, n_train=8, log_every=1,
          checkpoint_every=1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train_stage("tiny", "alpaca", out, **KW)
    return load_file(str(out / "model.safetensors"))


@pytest.fixture
def killed(tmp_path):
    """A stage folder as a kill after step 1 leaves it: checkpoint-1, no metrics.json."""
    out = tmp_path / "run"
    train_stage("tiny", "alpaca", out, keep_checkpoints=True, **KW)
    (out / "metrics.json").unlink()
    assert (out / "checkpoint-1" / "dcp" / ".metadata").exists()
    return out


def _same(a, b):
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_reads_safely_and_gives_the_same_weights(killed, uninterrupted):
    m = train_stage("tiny", "alpaca", killed, **KW)
    assert m["resumed_from_step"] == 1
    assert _same(load_file(str(killed / "model.safetensors")), uninterrupted)


@pytest.mark.parametrize("damage", ["metadata", "trainer_state", "shard", "rng"])
def test_a_damaged_checkpoint_is_named_with_the_command_that_removes_it(killed, uninterrupted, damage):
    ckpt = killed / "checkpoint-1"
    if damage == "metadata":
        (ckpt / "dcp" / ".metadata").write_bytes(os.urandom(100))
    elif damage == "trainer_state":
        data = (ckpt / "trainer_state.pt").read_bytes()
        (ckpt / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "shard":
        shard = next((ckpt / "dcp").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (ckpt / "rng-0.pt").write_bytes(b"")
    with pytest.raises(DamagedCheckpoint, match=rf"checkpoint {ckpt} cannot be read .*`rm -r {ckpt}`") as err:
        train_stage("tiny", "alpaca", killed, **KW)
    assert "\n" not in str(err.value)
    shutil.rmtree(ckpt)  # what the message says; the rerun then trains the stage from its start
    m = train_stage("tiny", "alpaca", killed, **KW)
    assert m["resumed_from_step"] is None
    assert _same(load_file(str(killed / "model.safetensors")), uninterrupted)


def test_a_checkpoint_of_another_config_is_named_not_a_key_error(killed):
    """`cfsam train --out D --lr 2e-3` over a killed lr 1e-3 run in D."""
    theirs = run_id({"model": "tiny", "dataset": "alpaca", **KW})
    ours = run_id({"model": "tiny", "dataset": "alpaca", **{**KW, "lr": 2e-3}})
    with pytest.raises(ValueError, match=rf"belongs to run {theirs}, not {ours}.*rm -r"):
        train_stage("tiny", "alpaca", killed, **{**KW, "lr": 2e-3})


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("target", ["trainer_state.pt", "rng-0.pt", "dcp/.metadata"])
def test_reading_a_checkpoint_runs_no_code_from_it(killed, tmp_path, target):
    """The cache may be copied between machines: a pickle that would run a command is refused, not run."""
    marker = tmp_path / "pwned"
    (killed / "checkpoint-1" / target).write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(DamagedCheckpoint, match="cannot be read"):
        train_stage("tiny", "alpaca", killed, **KW)
    assert not marker.exists()
