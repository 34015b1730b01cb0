"""What a stage writes: checkpoints of a running stage (model, optimizer, scheduler, scaler, RNG and data
position; atomic), and the saved models (snapshots along the run, the final model).

A checkpoint is read without running any code from it (the cache may be copied between machines):
``torch.load(weights_only=True)`` for the trainer state and RNG files, and DCP's pickled ``.metadata``
through an unpickler that admits only DCP's own metadata classes. A checkpoint that cannot be read is a
``DamagedCheckpoint`` naming it and the command that removes it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from cfsam.core.dist import Runtime, barrier, is_zero, unwrap
from cfsam.core.errors import UsageError
from cfsam.core.io import disk_error, write_json_atomic
from cfsam.data import models
from cfsam.training import zero

CKPT_PREFIX = "checkpoint-"


class DamagedCheckpoint(UsageError):
    """A checkpoint that cannot be read (truncated, overwritten, written by an older cfsam): the message names
    it and the command that removes it; the stage then trains from its start."""


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = [p for p in out_dir.glob(CKPT_PREFIX + "*") if p.is_dir() and p.name[len(CKPT_PREFIX):].isdigit()]
    return max(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]), default=None)


def _rng_state() -> dict:
    # tensors, ints and tuples only, so that weights_only=True reads it back (numpy's key as a tensor)
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
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
    try:
        if is_zero(rt.mode):  # the engine's own format: per-rank partitions of weights and optimizer state
            model.save_checkpoint(str(tmp / "zero"), tag="state", save_latest=False)
        else:
            model_sd, optim_sd = get_state_dict(model, opt)  # sharded under FSDP2, full otherwise
            with _quiet_dcp():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "dcp", no_dist=rt.mode == "none")
        torch.save(_rng_state(), tmp / f"rng-{rt.rank}.pt")
        if rt.rank == 0:
            torch.save({"step": step, "run_id": sid, "scheduler": sched.state_dict(), "history": history,
                        "scaler": scaler.state_dict() if scaler is not None else None, "world": rt.world},
                       tmp / "trainer_state.pt")
    except (OSError, RuntimeError, CheckpointException) as err:  # a full disk; torch.save says so as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # the last good checkpoint stays
        raise disk_error(tmp, err) from err
    barrier(rt)
    if rt.rank == 0:
        os.replace(tmp, final)  # atomic: a kill before this leaves only a .tmp, which resume ignores
        for old in out_dir.glob(CKPT_PREFIX + "*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(rt)
    return final


def load_checkpoint(ckpt: Path, model, opt, sched, scaler, sid: str, rt: Runtime) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    remove = f"delete it with `rm -r {ckpt}`"
    state = _read(ckpt, "trainer_state.pt", lambda: _trainer_state(ckpt / "trainer_state.pt"))
    if state["run_id"] != sid:
        raise UsageError(f"{ckpt} belongs to run {state['run_id']}, not {sid} (another config in the same out "
                         f"folder): use another --out, or {remove}")
    if is_zero(rt.mode):
        if not (ckpt / "zero").is_dir() or state["world"] != rt.world:
            raise UsageError(f"{ckpt} was not written by DeepSpeed with {rt.world} processes (it has "
                             f"{'a DeepSpeed' if (ckpt / 'zero').is_dir() else 'no DeepSpeed'} checkpoint of "
                             f"{state['world']}): resume with the same dist and process count, or {remove}")
        _read(ckpt, "zero/", lambda: model.load_checkpoint(str(ckpt / "zero"), tag="state", load_optimizer_states=True,
                                                          load_lr_scheduler_states=False))
    else:
        if not (ckpt / "dcp").is_dir():
            raise UsageError(f"{ckpt} was written under DeepSpeed: resume with the same dist, or {remove}")
        model_sd, optim_sd = get_state_dict(model, opt)
        _read(ckpt, "dcp/", lambda: _dcp_load({"model": model_sd, "optim": optim_sd}, ckpt / "dcp", rt))
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    rng_file = ckpt / f"rng-{rt.rank}.pt"
    if rng_file.exists():
        _set_rng_state(_read(ckpt, rng_file.name, lambda: torch.load(rng_file, weights_only=True)))
    return state


def _trainer_state(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    missing = {"step", "run_id", "scheduler", "history", "scaler", "world"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise UsageError(f"not a trainer state (it lacks {', '.join(sorted(missing))})")
    return state


def _read(ckpt: Path, what: str, load):
    """``load()``, with any failure to read the checkpoint's files as a DamagedCheckpoint naming them."""
    try:
        return load()
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except (Exception, CheckpointException) as err:  # pickle, EOF, DCP's assertions, [Errno 22] on a cut shard
        cause = err
        if isinstance(err, CheckpointException):  # a BaseException holding each rank's error and traceback
            cause = next(iter(err.failures.values()), (err,))[0]
        msg = (str(cause).strip().splitlines() or [""])[0][:200]
        raise DamagedCheckpoint(f"checkpoint {ckpt} cannot be read ({what}: {type(cause).__name__}: {msg}); delete "
                                f"it with `rm -r {ckpt}` and run the same command again (the stage then trains "
                                "from its start)") from err


class _NotFromDCP(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "torch/distributed/checkpoint" not in record.pathname.replace(os.sep, "/")


def _dcp_load(state_dict: dict, path: Path, rt: Runtime) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import logger as dcp_logger

    # DCP logs a damaged checkpoint's tracebacks to the root logger before it raises: the one-line
    # DamagedCheckpoint says it all
    quiet = _NotFromDCP()
    loggers = [logging.getLogger(), dcp_logger._dcp_logger]
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        with _quiet_dcp():
            dcp.load(state_dict, storage_reader=_SafeReader(path), no_dist=rt.mode == "none")
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: admit DCP's own classes, torch dtypes and sizes, and nothing else
    (checked before anything is imported or called)."""

    PLAIN = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
             ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.PLAIN:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__.startswith("torch.distributed.checkpoint."):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class _SafeReader(FileSystemReader):
    """torch's FileSystemReader, its metadata read by ``_MetadataUnpickler`` instead of ``pickle.load``."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
        try:
            raw.save_pretrained(out, state_dict=full_sd)
            tokenizer.save_pretrained(out)
        except (OSError, SafetensorError) as err:  # a full disk: one line naming it
            if marker is not None:  # a snapshot folder holds nothing else: none half-written stays
                shutil.rmtree(out, ignore_errors=True)
            raise disk_error(out, err) from err
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
