"""What a stage writes: checkpoints of a running stage (model, optimizer, scheduler, scaler, RNG and data
position; atomic), and the saved models (snapshots along the run, the final model)."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from cfsam.core.dist import Runtime, barrier, is_zero, unwrap
from cfsam.core.io import write_json_atomic
from cfsam.data import models
from cfsam.training import zero

CKPT_PREFIX = "checkpoint-"


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = [p for p in out_dir.glob(CKPT_PREFIX + "*") if p.is_dir() and p.name[len(CKPT_PREFIX):].isdigit()]
    return max(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]), default=None)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _quiet_dcp():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
        yield


def save_checkpoint(out_dir: Path, step: int, model, opt, sched, scaler, history: dict, sid: str,
                     rt: Runtime) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = out_dir / f"{CKPT_PREFIX}{step}", out_dir / f"{CKPT_PREFIX}{step}.tmp"
    if rt.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(rt)
    if is_zero(rt.mode):  # the engine's own format: per-rank partitions of weights and optimizer state
        model.save_checkpoint(str(tmp / "zero"), tag="state", save_latest=False)
    else:
        model_sd, optim_sd = get_state_dict(model, opt)  # sharded under FSDP2, full otherwise
        with _quiet_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "dcp", no_dist=rt.mode == "none")
    # trusted files written by this code: torch.save keeps RNG tuples and numpy states as they are
    torch.save(_rng_state(), tmp / f"rng-{rt.rank}.pt")
    if rt.rank == 0:
        torch.save({"step": step, "run_id": sid, "scheduler": sched.state_dict(), "history": history,
                    "scaler": scaler.state_dict() if scaler is not None else None, "world": rt.world},
                   tmp / "trainer_state.pt")
    barrier(rt)
    if rt.rank == 0:
        os.replace(tmp, final)  # atomic: a kill before this leaves only a .tmp, which resume ignores
        for old in out_dir.glob(CKPT_PREFIX + "*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(rt)
    return final


def load_checkpoint(ckpt: Path, model, opt, sched, scaler, sid: str, rt: Runtime) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    if state["run_id"] != sid:
        raise ValueError(f"{ckpt} belongs to run {state['stage_id']}, not {sid}: use another out_dir or delete it")
    if is_zero(rt.mode):
        if not (ckpt / "zero").is_dir() or state["world"] != rt.world:
            raise ValueError(f"{ckpt} was not written by DeepSpeed with {rt.world} processes (it has "
                             f"{'a DeepSpeed' if (ckpt / 'zero').is_dir() else 'no DeepSpeed'} checkpoint of "
                             f"{state['world']}): resume with the same dist and process count, or delete it")
        model.load_checkpoint(str(ckpt / "zero"), tag="state", load_optimizer_states=True,
                              load_lr_scheduler_states=False)
    else:
        if not (ckpt / "dcp").is_dir():
            raise ValueError(f"{ckpt} was written under DeepSpeed: resume with the same dist, or delete it")
        model_sd, optim_sd = get_state_dict(model, opt)
        with _quiet_dcp():
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt / "dcp", no_dist=rt.mode == "none")
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    rng_file = ckpt / f"rng-{rt.rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


# ------------------------------------------------------------------------ saved models
def snapshot_name(at: int, of: int) -> str:
    """The folder, inside a stage's directory, of the model saved at point ``at`` of ``of`` along the run."""
    return f"snapshot-{at}of{of}"


def save_model(model, rt, tokenizer, out: Path, marker: dict | None = None) -> str | None:
    """Gather the full weights (FSDP, ZeRO) and save them with the tokenizer on rank 0; ``marker`` is written
    last as ``snapshot.json``. Returns the weights' hash (rank 0)."""
    raw = unwrap(model)
    if rt.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif is_zero(rt.mode):
        full_sd = zero.full_state_dict(model)
    else:
        full_sd = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
    weights = None
    if rt.rank == 0:
        weights = models.weights_hash(_StateDictView(full_sd))  # = weights_hash of the saved model, reloaded
        for tied in getattr(raw, "all_tied_weights_keys", None) or {}:
            full_sd.pop(tied, None)  # FSDP's full state dict holds a tied head as its own copy
        raw.save_pretrained(out, state_dict=full_sd)
        tokenizer.save_pretrained(out)
        if marker is not None:
            write_json_atomic(out / "snapshot.json", {**marker, "weights_hash": weights})
    barrier(rt)
    return weights


class _StateDictView:
    """Lets models.weights_hash hash a state dict we already hold."""

    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd
