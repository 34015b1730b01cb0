"""Wise-FT (Wortsman et al., 2022): interpolate the weights of two stages of the same model.

``theta = (1 - alpha) * theta_stage1 + alpha * theta_stage2``: alpha 0 is stage 1, alpha 1 is stage 2,
the paper's baseline uses 0.5. Every floating-point tensor of the state dict is interpolated in fp32;
integer buffers must agree. The merged model is written like a trained stage (``save_pretrained`` +
tokenizer) with ``merge.json`` last, whose presence marks a finished merge: the same merge again is
returned, not recomputed.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from cfsam.core.errors import UsageError
from cfsam.data import models
from cfsam.training.config import merge_id, model_ref

log = logging.getLogger(__name__)


@torch.no_grad()
def interpolate(sd1: dict, sd2: dict, alpha: float) -> dict:
    """(1 - alpha) * sd1 + alpha * sd2, key by key (fp32 arithmetic, cast back to each tensor's dtype)."""
    if sd1.keys() != sd2.keys():
        raise UsageError(f"the two models differ in parameters: only in stage 1 {sorted(sd1.keys() - sd2.keys())[:5]}, "
                         f"only in stage 2 {sorted(sd2.keys() - sd1.keys())[:5]}")
    out = {}
    for k, a in sd1.items():
        b = sd2[k]
        if a.shape != b.shape:
            raise UsageError(f"{k}: shape {tuple(a.shape)} in stage 1 but {tuple(b.shape)} in stage 2")
        if a.is_floating_point():
            out[k] = ((1.0 - alpha) * a.float() + alpha * b.float()).to(a.dtype)
        elif torch.equal(a, b):
            out[k] = a
        else:
            raise UsageError(f"{k}: integer buffer differs between the stages and cannot be interpolated")
    return out


def wise_ft(stage1_dir, stage2_dir, out_dir, alpha: float = 0.5) -> Path:
    """Merge two saved stages into ``out_dir``; returns ``out_dir``."""
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise UsageError(f"alpha={alpha!r}; allowed: 0 <= alpha <= 1 (0: stage 1, 1: stage 2)")
    stage1_dir, stage2_dir, out_dir = Path(stage1_dir), Path(stage2_dir), Path(out_dir)
    for d in (stage1_dir, stage2_dir):
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"{d} is not a saved model directory (no config.json)")
    # ids by content (a run id, else the weights' hash), never by path: a moved cache keeps them
    record = {"method": "wise-ft", "alpha": float(alpha), "stage1": model_ref(stage1_dir),
              "stage2": model_ref(stage2_dir)}
    record["run_id"] = merge_id(record["stage1"], record["stage2"], alpha)
    if (out_dir / "merge.json").exists():
        done = json.loads((out_dir / "merge.json").read_text())
        if done.get("run_id") == record["run_id"]:
            log.info("merge %s already in %s", record["run_id"], out_dir)
            return out_dir
        raise UsageError(f"{out_dir} holds another merge ({done.get('run_id')}); use another out_dir or delete it")

    m1 = models.load_model(str(stage1_dir)).model
    loaded2 = models.load_model(str(stage2_dir))
    merged = interpolate(m1.state_dict(), loaded2.model.state_dict(), alpha)
    del m1
    model = loaded2.model
    model.load_state_dict(merged)
    record["weights_hash"] = models.weights_hash(model)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    loaded2.tokenizer.save_pretrained(tmp)
    (tmp / "merge.json").write_text(json.dumps(record, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # a killed merge leaves only the .tmp directory
    log.info("Wise-FT alpha=%s of %s and %s -> %s", alpha, stage1_dir, stage2_dir, out_dir)
    return out_dir
