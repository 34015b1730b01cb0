"""Issue 27 #8: a disk that fills while a model or a checkpoint is written is one line naming the path and
the free space, and no half-written checkpoint, snapshot or converted model stays."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from safetensors import SafetensorError

from cfsam.core.io import DiskError
from cfsam.data import models

KW = dict(optimizer="adamw", lr=1e-3, epochs=1, batch_size=4, grad_accum=1, max_length=64, n_train=8, log_every=1)


def _train_with_a_small_disk(out, **options) -> subprocess.CompletedProcess:
    """train_stage in a process whose files may not grow past 4 MB (RLIMIT_FSIZE: writes fail as on a full
    disk, without a tmpfs to mount; the tiny model's weights are ~29 MB)."""
    script = textwrap.dedent(f"""
        import json, resource, signal
        from cfsam.training.stage import train_stage
        from cfsam.data import models
        from cfsam.data import formatting
        # the tokenizer's conversion and the tokenised examples are cached before the limit
        formatting.build_dataset("alpaca", models.load_tokenizer("tiny"), n=8, seed=1234, max_length=64)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
        try:
            train_stage("tiny", "alpaca", {str(out)!r}, **{json.dumps({**KW, **options})})
        except OSError as err:
            print(json.dumps({{"type": type(err).__name__, "message": str(err)}}))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["checkpoint", "model"])
def test_a_full_disk_while_training_names_the_path(tmp_path, where):
    out = tmp_path / "run"
    proc = _train_with_a_small_disk(out, checkpoint_every=1 if where == "checkpoint" else 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    path = out / "checkpoint-1.tmp" if where == "checkpoint" else out
    assert err["type"] == "DiskError" and err["message"].startswith(f"cannot write {path}: ")
    assert "GB free on" in err["message"] and "\n" not in err["message"]
    assert not list(out.glob("checkpoint-*"))  # no partial checkpoint left to resume from


def test_a_full_disk_while_converting_leaves_no_half_model(tmp_path, monkeypatch):
    """The GGUF conversion (the first load on a fresh cache), with a disk that fills while it saves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tiny = models.load_model("tiny")
    monkeypatch.setenv("CFSAM_CACHE", str(tmp_path))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.tokenizer)

    def full(self, *a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", full)
    with pytest.raises(DiskError, match=rf"cannot write {tmp_path}/models/smollm2-135m.tmp: Error while "
                                        r"serializing.*No space left on device.*GB free on"):
        models.prepare("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m.tmp").exists()
    assert not (tmp_path / "models" / "smollm2-135m").exists()
