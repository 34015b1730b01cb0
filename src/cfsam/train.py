"""One stage of continual instruction tuning: model + dataset + AdamW or SAM -> a trained model directory.

Why a short explicit loop and not ``transformers.Trainer``: SAM takes two forward/backward passes over
the same micro-batches with the weights moved in between, and the norm that sets the move must be
the norm of the whole gradient (accumulated over micro-batches, reduced over ranks). Trainer owns the
accumulation loop, the backward, clipping and the optimizer step (under FSDP/DeepSpeed accelerate
wraps the optimizer too), so SAM there means overriding ``training_step`` against its accumulation
counters; the paper's code ends up with three passes and per-shard norms. Here every pass is in
view (``optimizer_step``) and distribution is torch's own: DDP (``no_sync`` on all but the last
micro-batch) or FSDP2 ``fully_shard`` per decoder layer, whose DTensor gradients ``cfsam.optim.SAM``
reduces exactly. ``torchrun`` / ``accelerate launch`` only launch it: rank and world size come from
the environment (accelerate's FSDP plugin needs an accelerator, this runs on CPU as well).

DeepSpeed ZeRO-1/2/3 (``dist='zero1'|'zero2'|'zero3'``, or ``auto`` under an accelerate DeepSpeed
config): the engine owns the backward (gradients are reduced into per-rank partitions), the fp32
master weights, clipping and the step, so the same loop drives it through ``engine.backward`` /
``engine.step()`` and SAM moves the weights around the engine (``cfsam.zero.ZeroSAM``: global norm
over the partitions, the perturbation applied to what the forward gathers, restored by copy). cfsam
builds the engine's config itself from its own options (batch split, ``max_grad_norm`` as DeepSpeed's
clipping, fp32 weights with bf16 as autocast); checkpoints are the engine's own
(``save_checkpoint``), resumed with the same number of processes.

Batch semantics: ``batch_size`` is the global number of examples per optimizer step (the paper's 128);
each rank runs ``grad_accum`` micro-batches of ``batch_size / (grad_accum * world_size)``. The loss is
the mean over every response token of the global batch (``num_items_in_batch``), so one process and N
processes make the same updates. SAM with accumulation perturbs with the whole batch's gradient, then
re-runs the same micro-batches at the perturbed point. Each epoch is a fresh permutation seeded by
(seed, epoch); a last partial batch is dropped.

``out_dir`` gets the model (``save_pretrained`` + tokenizer) and ``metrics.json``, written last: its
presence marks a finished run, and a finished run with the same config is returned, not redone.
While running, ``checkpoint-<step>/`` holds torch.distributed.checkpoint shards of model and
optimizer (SAM state included), the scheduler, the GradScaler, RNG states and the position in the
data; each is written under ``.tmp`` and renamed, only the latest is kept, and a rerun resumes from
it. A NaN loss stops the run with ``TrainingDiverged``; the last good checkpoint stays.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import math
import os
import random
import resource
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from cfsam import data as cfdata
from cfsam import models, zero
from cfsam.io import config_hash, write_json_atomic
from cfsam.optim import SAM, global_norm

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sam")
DISTS = ("auto", "none", "ddp", "fsdp", "zero1", "zero2", "zero3")  # zeroN: DeepSpeed ZeRO stage N
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
DEFAULT_REHEARSAL_FRACTION = 0.1  # share of stage-1 examples in the stage-2 mix when rehearsal is asked for
CKPT_PREFIX = "checkpoint-"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stopped; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------ config
def stage_id(config: dict) -> str:
    """A short hash of a stage's config: same config, same id (and same cached model)."""
    return config_hash(config)


# what changes the trained weights; dist, checkpoint/log intervals and callbacks do not
CONFIG_KEYS = ("optimizer", "lr", "epochs", "batch_size", "grad_accum", "max_length", "n_train", "seed",
               "warmup_ratio", "weight_decay", "lr_scheduler", "max_grad_norm", "precision", "max_steps")


def stage_config(model_name_or_dir, dataset, **kw) -> dict:
    """The validated config of a stage (``train_stage``'s arguments): what ``stage_id`` hashes."""
    kw = {**TRAIN_DEFAULTS, **kw}
    _validate(**kw)
    config = {k: kw[k] for k in CONFIG_KEYS}
    config["model"] = _model_ref(str(model_name_or_dir))
    config["data"] = _data_ref(dataset)
    if kw["optimizer"] == "sam":
        config.update(rho=float(kw["rho"]), adaptive=bool(kw["adaptive"]))
    if kw["rehearsal_fraction"] > 0:
        config["rehearsal"] = {"from": _data_ref(kw["rehearsal_from"]), "fraction": kw["rehearsal_fraction"]}
    return config


def _model_ref(model_name_or_dir: str) -> dict:
    """What identifies the starting weights: a preset name, or a directory (and its stage id)."""
    path = Path(model_name_or_dir)
    if path.is_dir():
        ref = {"dir": str(path.resolve())}
        for marker in ("metrics.json", "merge.json"):
            if (path / marker).exists():
                ref["stage_id"] = json.loads((path / marker).read_text()).get("stage_id")
        return ref
    models.model_spec(model_name_or_dir)  # unknown preset: KeyError naming the allowed ones
    return {"preset": model_name_or_dir}


def _data_ref(dataset) -> dict:
    if isinstance(dataset, str):
        if dataset not in cfdata.dataset_names("train"):
            raise ValueError(f"unknown training dataset {dataset!r}; allowed: "
                             f"{', '.join(cfdata.dataset_names('train'))} (or a datasets.Dataset)")
        return {"name": dataset, "sha256": cfdata.file_hashes(dataset)}
    cols = set(getattr(dataset, "column_names", []) or [])
    if not {"input_ids", "labels"} <= cols:
        raise ValueError(f"dataset must be a registry name or a datasets.Dataset with input_ids and labels "
                         f"columns; got {type(dataset).__name__} with columns {sorted(cols)}")
    return {"fingerprint": getattr(dataset, "_fingerprint", None), "rows": len(dataset)}


def _validate(**kw) -> None:
    def bad(name, allowed):
        raise ValueError(f"{name}={kw[name]!r}; allowed: {allowed}")

    if kw["optimizer"] not in OPTIMIZERS:
        bad("optimizer", " | ".join(OPTIMIZERS))
    for name in ("lr", "epochs"):
        if not (isinstance(kw[name], (int, float)) and math.isfinite(kw[name]) and kw[name] > 0):
            bad(name, "a number > 0")
    for name in ("batch_size", "grad_accum", "log_every"):
        if not (isinstance(kw[name], int) and kw[name] >= 1):
            bad(name, "an integer >= 1")
    if not (isinstance(kw["max_length"], int) and kw["max_length"] >= 8):
        bad("max_length", "an integer >= 8")
    for name in ("n_train", "max_steps"):
        if kw[name] is not None and not (isinstance(kw[name], int) and kw[name] >= 1):
            bad(name, "None or an integer >= 1")
    if not (isinstance(kw["checkpoint_every"], int) and kw["checkpoint_every"] >= 0):
        bad("checkpoint_every", "an integer >= 0 (0: no checkpoints)")
    if kw["batch_size"] % kw["grad_accum"]:
        raise ValueError(f"batch_size={kw['batch_size']} (global) must be a multiple of grad_accum={kw['grad_accum']}")
    if kw["optimizer"] == "sam" and not (isinstance(kw["rho"], (int, float)) and kw["rho"] > 0):
        bad("rho", "a number > 0 for SAM (the paper uses 2)")
    if not 0.0 <= kw["rehearsal_fraction"] < 1.0:
        bad("rehearsal_fraction", "0 <= fraction < 1")
    if kw["rehearsal_fraction"] > 0 and kw["rehearsal_from"] is None:
        raise ValueError(f"rehearsal_fraction={kw['rehearsal_fraction']} needs rehearsal_from (the stage-1 dataset)")
    if not 0.0 <= kw["warmup_ratio"] <= 1.0:
        bad("warmup_ratio", "0 <= ratio <= 1")
    if not kw["weight_decay"] >= 0:
        bad("weight_decay", "a number >= 0")
    if kw["max_grad_norm"] is not None and not kw["max_grad_norm"] > 0:
        bad("max_grad_norm", "None (no clipping) or a number > 0")
    if kw["lr_scheduler"] not in SCHEDULERS:
        bad("lr_scheduler", " | ".join(SCHEDULERS))
    if kw["precision"] not in PRECISIONS:
        bad("precision", " | ".join(PRECISIONS))
    if kw["dist"] not in DISTS:
        bad("dist", " | ".join(DISTS))


# ------------------------------------------------------------------------------ distribution
@dataclass
class Runtime:
    mode: str  # none | ddp | fsdp | zero1 | zero2 | zero3
    rank: int
    world: int
    device: torch.device
    created_group: bool


def _is_zero(mode: str) -> bool:
    return mode.startswith("zero")


def _deepspeed_mode() -> str:
    """The dist mode an accelerate DeepSpeed config asks for; refuses what cfsam's engine setup ignores."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    if stage not in ("1", "2", "3"):
        raise ValueError(f"ACCELERATE_DEEPSPEED_ZERO_STAGE={stage}: cfsam's trainer runs ZeRO stage 1, 2 or 3 "
                         "(stage 0 is plain data parallelism: use configs/accelerate_ddp.yaml)")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() not in ("", "none"):
        raise ValueError(f"deepspeed_config_file={os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']} is not read: "
                         "cfsam builds the engine's config from its own options; set zero_stage in the "
                         "accelerate config instead")
    for flag in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        if os.environ.get(flag, "none").lower() not in ("", "none"):
            raise ValueError(f"{flag}={os.environ[flag]} is not supported by cfsam's trainer; set it to none")
    return f"zero{stage}"


def _setup_distributed(mode: str) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            mode = _deepspeed_mode()
        else:
            mode = "fsdp" if use_fsdp else ("ddp" if world > 1 or dist.is_initialized() else "none")
    if _is_zero(mode) and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"dist={mode!r} needs DeepSpeed: pip install deepspeed (the `cluster` extra)")
    if mode == "fsdp":  # what an accelerate FSDP config asks for, where it differs from what runs here
        if os.environ.get("FSDP_VERSION", "2") != "2":
            raise ValueError(f"FSDP_VERSION={os.environ['FSDP_VERSION']}: cfsam's trainer runs FSDP2 "
                             "(fully_shard); set fsdp_version: 2 in the accelerate config")
        for flag in ("FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING"):
            if os.environ.get(flag, "false").lower() == "true":
                raise ValueError(f"{flag}=true is not supported by cfsam's trainer; set it to false")
    created = False
    if mode != "none" and not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(f"dist={mode!r} needs a launcher: torchrun --nproc_per_node N or accelerate launch")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        created = True
    rank = dist.get_rank() if mode != "none" else 0
    world = dist.get_world_size() if mode != "none" else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Runtime(mode, rank, world, device, created)


def _wrap(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    if _is_zero(rt.mode):
        return model  # deepspeed.initialize moves (and under ZeRO-3 partitions) it, with the optimizer
    model.to(rt.device)
    if rt.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # one FSDP unit per decoder layer, the root holds embeddings, final norm and the (tied) head
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        for layer in model.model.layers:
            fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
    return model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _barrier(rt: Runtime) -> None:
    if rt.mode != "none":
        dist.barrier()


# ------------------------------------------------------------------------------ one update
@dataclass
class StepContext:
    world: int = 1
    no_sync: Callable | None = None  # DDP's model.no_sync; None: synchronise every micro-batch
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    max_grad_norm: float | None = None
    device_type: str = "cpu"
    engine: object | None = None  # a DeepSpeed engine (the model): backward and step go through it


def _backward(loss: torch.Tensor, is_last: bool, ctx: StepContext) -> None:
    if ctx.engine is None:
        (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        return
    # the loss is already this micro-batch's share of the global mean: no division by the
    # accumulation steps; the boundary flag makes the last backward of each pass complete the reduction
    ctx.engine.set_gradient_accumulation_boundary(is_last)
    ctx.engine.backward(loss, scale_wrt_gas=False)


def _passes(model, micro_batches, n_items, ctx: StepContext) -> torch.Tensor:
    """Forward+backward over the micro-batches; gradients of the global mean token loss. Returns this
    rank's share of that loss."""
    total = torch.zeros((), device=n_items.device)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if ctx.no_sync is None or last else ctx.no_sync():
            with torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast_dtype is not None):
                loss = model(**mb, num_items_in_batch=n_items).loss
            # DDP, FSDP and DeepSpeed average gradients over ranks; the loss is already a share of the global mean
            _backward(loss * ctx.world, last, ctx)
        total += loss.detach().float()
    return total


def _clip(params, norm: torch.Tensor, max_norm: float | None) -> None:
    if max_norm is not None and float(norm) > max_norm:
        coef = max_norm / (float(norm) + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


def optimizer_step(model, opt, micro_batches: list[dict], ctx: StepContext) -> dict:
    """One optimizer update from this rank's micro-batches (AdamW: one pass; SAM: two).

    Returns {"loss", "grad_norm", "perturbation_norm", "sam_grad_norm", "skipped"} (global values).
    With an fp16 GradScaler each SAM pass is unscaled before its norm is taken; the scaler is updated
    after each pass (so its growth counter counts passes), and an overflow in either pass skips the
    update with the weights restored. Raises TrainingDiverged on a non-finite loss.
    Under DeepSpeed (``ctx.engine``) ``opt`` is a ``cfsam.zero.ZeroSAM`` or None (AdamW)."""
    if ctx.engine is not None:
        return _engine_step(model, opt, micro_batches, ctx)
    params = [p for g in opt.param_groups for p in g["params"]]
    n_items = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro_batches)
    if ctx.world > 1:
        dist.all_reduce(n_items)
    n_items = n_items.clamp(min=1)
    loss = _passes(model, micro_batches, n_items, ctx)
    if ctx.world > 1:
        dist.all_reduce(loss)
    out = {"loss": float(loss), "grad_norm": None, "perturbation_norm": None, "sam_grad_norm": None, "skipped": False}
    if not math.isfinite(out["loss"]):
        opt.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss is {out['loss']}")
    scaler = ctx.scaler
    if scaler is not None:
        scaler.unscale_(opt)
    if isinstance(opt, SAM):
        out["grad_norm"] = float(opt.first_step(zero_grad=True))
        out["perturbation_norm"] = opt.last_perturbation_norm
        if scaler is not None:
            scaler.update()  # closes pass 1, so that pass 2 can be unscaled
        if not math.isfinite(out["grad_norm"]):
            return _skip_or_raise(out, ctx, "gradient")
        _passes(model, micro_batches, n_items, ctx)
        if scaler is not None:
            scaler.unscale_(opt)
        norm2 = opt.grad_norm()
        out["sam_grad_norm"] = float(norm2)
        if not math.isfinite(out["sam_grad_norm"]):
            opt.restore()
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            return _skip_or_raise(out, ctx, "gradient at the SAM-perturbed point (is rho too large?)")
        _clip(params, norm2, ctx.max_grad_norm)
        opt.second_step(zero_grad=True)
        if scaler is not None:
            scaler.update()
        return out
    norm = global_norm([p.grad for p in params if p.grad is not None])
    out["grad_norm"] = float(norm)
    if not math.isfinite(out["grad_norm"]):
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return _skip_or_raise(out, ctx, "gradient")
    _clip(params, norm, ctx.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()
    return out


def _engine_step(engine, zsam, micro_batches: list[dict], ctx: StepContext) -> dict:
    """``optimizer_step`` on a DeepSpeed engine: the gradients live in the engine's partitions, the
    engine clips (at ``max_grad_norm``, with the same global norm) and steps. No GradScaler here
    (fp16 is refused), so a non-finite value always stops the run."""
    n_items = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro_batches)
    dist.all_reduce(n_items)
    n_items = n_items.clamp(min=1)
    loss = _passes(engine, micro_batches, n_items, ctx)
    dist.all_reduce(loss)
    out = {"loss": float(loss), "grad_norm": None, "perturbation_norm": None, "sam_grad_norm": None, "skipped": False}
    if not math.isfinite(out["loss"]):
        raise TrainingDiverged(f"loss is {out['loss']}")
    if zsam is None:
        out["grad_norm"] = float(zero.grad_norm(engine))
    else:
        out["grad_norm"] = float(zsam.first_step())
        out["perturbation_norm"] = zsam.last_perturbation_norm
        if math.isfinite(out["grad_norm"]):
            _passes(engine, micro_batches, n_items, ctx)
            out["sam_grad_norm"] = float(zsam.grad_norm())
            zsam.restore()
            if not math.isfinite(out["sam_grad_norm"]):
                raise TrainingDiverged("non-finite gradient at the SAM-perturbed point (is rho too large?)")
    if not math.isfinite(out["grad_norm"]):
        raise TrainingDiverged("non-finite gradient")
    engine.set_gradient_accumulation_boundary(True)
    engine.step()  # clips, steps the fp32 masters, copies them into the module, zeroes the gradients
    return out


def _skip_or_raise(out: dict, ctx: StepContext, what: str) -> dict:
    if ctx.scaler is None:  # no loss scale to lower: a real divergence
        raise TrainingDiverged(f"non-finite {what}")
    out["skipped"] = True  # fp16 overflow: the scaler has lowered its scale, try the next batch
    return out


# ------------------------------------------------------------------------------ checkpoints
def _latest_checkpoint(out_dir: Path) -> Path | None:
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


def _save_checkpoint(out_dir: Path, step: int, model, opt, sched, scaler, history: dict, sid: str,
                     rt: Runtime) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = out_dir / f"{CKPT_PREFIX}{step}", out_dir / f"{CKPT_PREFIX}{step}.tmp"
    if rt.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(rt)
    if _is_zero(rt.mode):  # the engine's own format: per-rank partitions of weights and optimizer state
        model.save_checkpoint(str(tmp / "zero"), tag="state", save_latest=False)
    else:
        model_sd, optim_sd = get_state_dict(model, opt)  # sharded under FSDP2, full otherwise
        with _quiet_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "dcp", no_dist=rt.mode == "none")
    # trusted files written by this code: torch.save keeps RNG tuples and numpy states as they are
    torch.save(_rng_state(), tmp / f"rng-{rt.rank}.pt")
    if rt.rank == 0:
        torch.save({"step": step, "stage_id": sid, "scheduler": sched.state_dict(), "history": history,
                    "scaler": scaler.state_dict() if scaler is not None else None, "world": rt.world},
                   tmp / "trainer_state.pt")
    _barrier(rt)
    if rt.rank == 0:
        os.replace(tmp, final)  # atomic: a kill before this leaves only a .tmp, which resume ignores
        for old in out_dir.glob(CKPT_PREFIX + "*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(rt)
    return final


def _load_checkpoint(ckpt: Path, model, opt, sched, scaler, sid: str, rt: Runtime) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    if state["stage_id"] != sid:
        raise ValueError(f"{ckpt} belongs to stage {state['stage_id']}, not {sid}: use another out_dir or delete it")
    if _is_zero(rt.mode):
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


# ------------------------------------------------------------------------------ the stage
def _build_optimizer(model, optimizer: str, lr: float, weight_decay: float, rho: float, adaptive: bool):
    # no weight decay on biases and norm weights, as transformers.Trainer does
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "sam":
        return SAM(groups, torch.optim.AdamW, rho=rho, adaptive=adaptive, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)



def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def train_stage(model_name_or_dir: str, dataset, out_dir, *, optimizer: str = "adamw", lr: float = 1e-4,
                epochs: float = 1.0, batch_size: int = 8, grad_accum: int = 1, max_length: int = 256,
                n_train: int | None = None, seed: int = 1234, rho: float = 2.0, adaptive: bool = False,
                rehearsal_from=None, rehearsal_fraction: float = 0.0, warmup_ratio: float = 0.03,
                weight_decay: float = 0.0, lr_scheduler: str = "cosine", max_grad_norm: float | None = 1.0,
                precision: str = "fp32", checkpoint_every: int = 0, log_every: int = 10,
                max_steps: int | None = None, dist: str = "auto", keep_checkpoints: bool = False,
                callback: Callable[[dict], None] | None = None) -> dict:
    """Train one stage and return its metrics (see the module docstring for files and semantics).

    ``dataset``: a training-set name of ``cfsam.data`` or a tokenised ``datasets.Dataset``
    (input_ids, labels). ``rehearsal_from`` (a name or Dataset) with ``rehearsal_fraction`` mixes
    that share of stage-1 examples into this stage (``cfsam.data.mix_rehearsal``); with the same
    ``seed`` and a registry name they are drawn from the examples stage 1 trained on.
    ``callback(record)`` is called on every rank after each update (record: step, loss, norms, lr).

    ``dist``: auto (from the launcher's environment: FSDP2 under accelerate's FSDP config, DeepSpeed
    ZeRO of the configured stage under accelerate's DeepSpeed config, DDP with several processes, else
    none) | none | ddp | fsdp | zero1 | zero2 | zero3 (DeepSpeed ZeRO stage 1-3). ``precision``: fp32 |
    bf16 (autocast) | fp16 (autocast + GradScaler; not with FSDP or ZeRO); weights and optimizer state
    stay fp32. ``max_grad_norm``
    clips the applied gradient (SAM: the one at w + e) to that global norm, 1.0 as in
    transformers.Trainer (the Alpaca recipe of stage 1); None turns clipping off. ``max_steps`` caps
    ``epochs``. ``checkpoint_every``: steps between checkpoints (0: none).
    """
    kw = dict(optimizer=optimizer, lr=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
              max_length=max_length, n_train=n_train, seed=seed, rho=rho, adaptive=adaptive,
              rehearsal_from=rehearsal_from, rehearsal_fraction=rehearsal_fraction, warmup_ratio=warmup_ratio,
              weight_decay=weight_decay, lr_scheduler=lr_scheduler, max_grad_norm=max_grad_norm,
              precision=precision, checkpoint_every=checkpoint_every, log_every=log_every, max_steps=max_steps,
              dist=dist)
    config = stage_config(model_name_or_dir, dataset, **kw)
    sid = stage_id(config)
    out_dir = Path(out_dir)
    done = out_dir / "metrics.json"
    if done.exists():
        metrics = json.loads(done.read_text())
        if metrics.get("stage_id") == sid:
            log.info("stage %s already trained in %s: reusing it", sid, out_dir)
            return metrics
        raise ValueError(f"{out_dir} holds a finished run of another config (stage {metrics.get('stage_id')}, "
                         f"this one is {sid}): use another out_dir or delete it")

    rt = _setup_distributed(dist)
    launcher_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_mp not in ("no", precision):
        log.warning("accelerate's mixed_precision=%s is not used: this stage runs precision=%s "
                    "(set cfsam's --precision instead)", launcher_mp, precision)
    if _is_zero(rt.mode):  # the accelerate DeepSpeed config's own values; cfsam's options drive the engine
        for env, ours, flag in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", grad_accum, "--grad-accum"),
                                ("ACCELERATE_GRADIENT_CLIPPING", max_grad_norm, "--max-grad-norm")):
            if env in os.environ and os.environ[env] != str(ours).lower():
                log.warning("accelerate's %s=%s is not used: this stage runs %s %s", env, os.environ[env], flag, ours)
    if precision == "fp16" and (rt.mode == "fsdp" or _is_zero(rt.mode)):
        raise ValueError(f"precision='fp16' is not supported with dist={rt.mode!r} here (its GradScaler would need "
                         "sharded inf checks); use precision='bf16'")
    micro_total = grad_accum * rt.world
    if batch_size % micro_total:
        raise ValueError(f"batch_size={batch_size} (global) must be a multiple of grad_accum * world_size = "
                         f"{grad_accum} * {rt.world}")
    try:
        return _run(model_name_or_dir, dataset, out_dir, config, sid, kw, rt, keep_checkpoints, callback)
    finally:
        if rt.created_group:
            torch.distributed.destroy_process_group()


def _load_data(dataset, tokenizer, kw) -> tuple:
    if isinstance(dataset, str):
        ds = cfdata.build_dataset(dataset, tokenizer, n=kw["n_train"], seed=kw["seed"], max_length=kw["max_length"])
    else:
        ds = dataset if kw["n_train"] is None else dataset.select(range(min(kw["n_train"], len(dataset))))
        if kw["n_train"] is not None and len(dataset) < kw["n_train"]:
            raise ValueError(f"n_train={kw['n_train']} but the dataset has {len(dataset)} rows")
    info = {"dataset": dataset if isinstance(dataset, str) else "custom",
            "label": cfdata.label(dataset) if isinstance(dataset, str) else None, "n_stage": len(ds)}
    frac = kw["rehearsal_fraction"]
    if frac > 0:
        src = kw["rehearsal_from"]
        k = round(frac * len(ds) / (1.0 - frac))
        if isinstance(src, str):
            replay = cfdata.build_dataset(src, tokenizer, n=max(k, 1), seed=kw["seed"], max_length=kw["max_length"])
        else:
            replay = src
        ds = cfdata.mix_rehearsal(ds, replay, frac, seed=kw["seed"])
        info.update(rehearsal_from=src if isinstance(src, str) else "custom", rehearsal_fraction=frac,
                    rehearsal_label=cfdata.label(src) if isinstance(src, str) else None,
                    n_rehearsal=len(ds) - info["n_stage"])
    info["n_examples"] = len(ds)
    return ds.select_columns(["input_ids", "labels"]), info


def _run(model_name_or_dir, dataset, out_dir: Path, config: dict, sid: str, kw: dict, rt: Runtime,
         keep_checkpoints: bool, callback) -> dict:
    t_start = time.time()
    torch.manual_seed(kw["seed"])
    random.seed(kw["seed"])
    np.random.seed(kw["seed"])
    loaded = models.load_model(str(model_name_or_dir), dtype=torch.float32)
    tokenizer = loaded.tokenizer
    ds, data_info = _load_data(dataset, tokenizer, kw)

    batch_size, grad_accum = kw["batch_size"], kw["grad_accum"]
    steps_per_epoch = len(ds) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(ds)} examples are fewer than one batch (batch_size={batch_size})")
    total_steps = max(1, math.ceil(kw["epochs"] * steps_per_epoch))
    if kw["max_steps"] is not None:
        total_steps = min(total_steps, kw["max_steps"])

    micro = batch_size // (grad_accum * rt.world)
    model = _wrap(loaded.model, rt)
    model.train()
    if _is_zero(rt.mode):
        # the engine steps a plain AdamW (the client optimizer); SAM's two passes sit around the engine
        sched_opt = _build_optimizer(model, "adamw", kw["lr"], kw["weight_decay"], kw["rho"], kw["adaptive"])
        model = zero.initialize(model, sched_opt, zero.engine_config(int(rt.mode[-1]), micro, grad_accum, rt.world,
                                                                     kw["max_grad_norm"]))
        opt = zero.ZeroSAM(model, rho=kw["rho"], adaptive=kw["adaptive"]) if kw["optimizer"] == "sam" else None
    else:
        opt = _build_optimizer(model, kw["optimizer"], kw["lr"], kw["weight_decay"], kw["rho"], kw["adaptive"])
        sched_opt = opt.base_optimizer if isinstance(opt, SAM) else opt  # SAM steps through its base optimizer
    from transformers import get_scheduler

    sched = get_scheduler(kw["lr_scheduler"], sched_opt, num_warmup_steps=math.ceil(kw["warmup_ratio"] * total_steps),
                          num_training_steps=total_steps)
    precision = kw["precision"]
    scaler = torch.amp.GradScaler(rt.device.type) if precision == "fp16" else None
    ctx = StepContext(world=rt.world, no_sync=model.no_sync if rt.mode == "ddp" else None,
                      autocast_dtype={"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
                      scaler=scaler, max_grad_norm=kw["max_grad_norm"], device_type=rt.device.type,
                      engine=model if _is_zero(rt.mode) else None)

    history = {"step": [], "loss": [], "grad_norm": [], "sam_grad_norm": [], "perturbation_norm": [], "lr": [],
               "skipped": [], "tokens": 0, "train_seconds": 0.0}
    start_step, resumed_from = 0, None
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = _latest_checkpoint(out_dir)
    if ckpt is not None:
        state = _load_checkpoint(ckpt, model, opt, sched, scaler, sid, rt)
        start_step, resumed_from, history = state["step"], state["step"], state["history"]
        log.info("resuming stage %s from %s (step %d of %d)", sid, ckpt, start_step, total_steps)
    last_ckpt = ckpt

    pad_id = tokenizer.pad_token_id
    bar = tqdm(total=total_steps, initial=start_step, disable=rt.rank != 0, desc=f"train {kw['optimizer']}")
    t_loop = time.time()
    for step in range(start_step, total_steps):
        # the data order is a function of (seed, epoch): a resumed run sees the same batches
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(kw["seed"] + epoch))
        mine = perm[pos * batch_size:(pos + 1) * batch_size][rt.rank * micro * grad_accum:][:micro * grad_accum]
        micro_batches = []
        n_tokens = torch.zeros((), dtype=torch.long)
        for j in range(grad_accum):
            rows = ds[mine[j * micro:(j + 1) * micro].tolist()]
            feats = [{"input_ids": a, "labels": b} for a, b in zip(rows["input_ids"], rows["labels"])]
            mb = cfdata.collate(feats, pad_id)
            n_tokens += mb["attention_mask"].sum()
            micro_batches.append({k: v.to(rt.device) for k, v in mb.items()})
        lr_now = sched.get_last_lr()[0]
        try:
            rec = optimizer_step(model, opt, micro_batches, ctx)
        except TrainingDiverged as err:
            bar.close()
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise TrainingDiverged(f"stage {sid} stopped at step {step + 1}/{total_steps} (epoch {epoch}): {err}; "
                                   f"{where}. Lower lr{' or rho' if kw['optimizer'] == 'sam' else ''}, "
                                   f"or use precision fp32/bf16.") from err
        sched.step()
        if rt.world > 1:
            n_tokens = n_tokens.to(rt.device)
            dist.all_reduce(n_tokens)
        history["tokens"] += int(n_tokens)
        rec.update(step=step + 1, lr=lr_now)
        for key in ("step", "loss", "grad_norm", "sam_grad_norm", "perturbation_norm", "lr", "skipped"):
            history[key].append(rec[key])
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if rt.rank == 0 and ((step + 1) % kw["log_every"] == 0 or step + 1 == total_steps):
            extra = f" perturbation {rec['perturbation_norm']:.3f}" if rec["perturbation_norm"] is not None else ""
            log.info("step %d/%d loss %.4f grad_norm %.3f%s lr %.3g", step + 1, total_steps, rec["loss"],
                     rec["grad_norm"], extra, lr_now)
        if callback is not None:
            callback(dict(rec))
        if kw["checkpoint_every"] and (step + 1) % kw["checkpoint_every"] == 0 and step + 1 < total_steps:
            history["train_seconds"] += time.time() - t_loop
            t_loop = time.time()
            last_ckpt = _save_checkpoint(out_dir, step + 1, model, opt, sched, scaler, history, sid, rt)
    bar.close()
    history["train_seconds"] += time.time() - t_loop

    # ---- the trained model, then metrics.json (the marker of a finished run)
    raw = _unwrap(model)
    if rt.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif _is_zero(rt.mode):
        full_sd = zero.full_state_dict(model)
    else:
        full_sd = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
    peak, peak_kind = _peak_memory(rt.device)
    metrics = None
    if rt.rank == 0:
        weights = models.weights_hash(_StateDictView(full_sd))  # = weights_hash of the saved model, reloaded
        for tied in getattr(raw, "all_tied_weights_keys", None) or {}:
            full_sd.pop(tied, None)  # FSDP's full state dict holds a tied head as its own copy
        raw.save_pretrained(out_dir, state_dict=full_sd)
        tokenizer.save_pretrained(out_dir)
        metrics = {
            "stage_id": sid, "status": "finished", "config": config, "data": data_info,
            "model_source": loaded.source, "out_dir": str(out_dir),
            "weights_hash": weights,
            "steps": history["step"], "loss": history["loss"], "grad_norm": history["grad_norm"],
            "sam_grad_norm": history["sam_grad_norm"], "perturbation_norm": history["perturbation_norm"],
            "lr": history["lr"], "skipped": history["skipped"], "final_loss": history["loss"][-1],
            "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "resumed_from_step": resumed_from,
            "tokens": history["tokens"], "train_seconds": history["train_seconds"],
            "tokens_per_s": history["tokens"] / max(history["train_seconds"], 1e-9),
            "wall_seconds": time.time() - t_start, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
            "world_size": rt.world, "dist": rt.mode, "device": str(rt.device), "torch": torch.__version__,
        }
        write_json_atomic(out_dir / "metrics.json", metrics)
        if not keep_checkpoints:
            for old in out_dir.glob(CKPT_PREFIX + "*"):
                shutil.rmtree(old, ignore_errors=True)
        log.info("stage %s finished: %d steps, final loss %.4f, %s", sid, total_steps, metrics["final_loss"], out_dir)
    _barrier(rt)
    if metrics is None:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    return metrics


class _StateDictView:
    """Lets models.weights_hash hash a state dict we already hold."""

    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd


# train_stage's keyword defaults, for stage_config and the CLI
TRAIN_DEFAULTS = {name: p.default for name, p in inspect.signature(train_stage).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("keep_checkpoints", "callback")}


# ------------------------------------------------------------------------------ command line
def _preset_defaults(preset_name: str, stage: int | None, optimizer: str | None) -> dict:
    """train_stage arguments of a preset's stage 1 or stage 2 (epochs of stage 2 depend on the optimizer)."""
    from cfsam import presets

    if stage is None:
        raise ValueError("--preset needs --stage 1 or --stage 2")
    p = presets.load_preset(preset_name)
    out = {"seed": p["seed"], "max_length": p["max_length"], "model": p["model"]}
    if stage == 1:
        s = p["stage1"]
        out.update(dataset=p["data"]["stage1"], optimizer=s["optimizer"], lr=s["lr"], epochs=s["epochs"],
                   batch_size=s["batch_size"], grad_accum=s["grad_accum"], n_train=p["data"]["n_stage1"])
    else:
        s = p["stage2"]
        opt = optimizer or "adamw"
        out.update(optimizer=opt, lr=s["lr"], epochs=s["epochs_sam"] if opt == "sam" else s["epochs_adamw"],
                   batch_size=s["batch_size"], grad_accum=s["grad_accum"], rho=s["rho"], adaptive=s["adaptive"],
                   n_train=p["data"]["n_stage2"], rehearsal_fraction_default=p["rehearsal"]["fraction"],
                   rehearsal_from_default=p["data"]["stage1"])
        del out["model"]  # stage 2 starts from a stage-1 directory: --model is required
    return out


def cmd_train(args) -> int:
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = _preset_defaults(args.preset, args.stage, args.optimizer) if args.preset else {}
    model = given.get("model", preset.pop("model", None))
    dataset = given.get("dataset", preset.pop("dataset", None))
    if model is None or dataset is None:
        raise ValueError("cfsam train needs --model (a preset or a stage-1 directory) and --dataset "
                         "(or --preset NAME --stage 1)")
    replay_fraction = preset.pop("rehearsal_fraction_default", DEFAULT_REHEARSAL_FRACTION)
    replay_from = preset.pop("rehearsal_from_default", None)
    kw = {**TRAIN_DEFAULTS, **preset, **{k: given[k] for k in TRAIN_DEFAULTS if k in given}}
    if args.rehearsal or "rehearsal_from" in given or "rehearsal_fraction" in given:
        # replay what the starting model was trained on, when it is a stage directory that says so
        trained_on = Path(model) / "metrics.json"
        if replay_from is None and trained_on.exists():
            replay_from = json.loads(trained_on.read_text())["config"]["data"].get("name")
        kw["rehearsal_from"] = kw["rehearsal_from"] or replay_from
        if "rehearsal_fraction" not in given:
            kw["rehearsal_fraction"] = replay_fraction
    out = args.out or str(models.cache_dir() / "stages" / stage_id(stage_config(model, dataset, **kw)))
    metrics = train_stage(model, dataset, out, **kw)
    print(f"{out}\nstage {metrics['stage_id']}: {len(metrics['steps'])} steps, final loss "
          f"{metrics['final_loss']:.4f}, {metrics['tokens_per_s']:.0f} tokens/s")
    return 0


def cmd_merge(args) -> int:
    from cfsam.merge import wise_ft

    print(wise_ft(args.stage1, args.stage2, args.out, alpha=args.alpha))
    return 0


def add_cli(subparsers) -> None:
    """Register ``cfsam train`` (stage 1 / stage 2) and ``cfsam merge`` (Wise-FT)."""
    t = subparsers.add_parser(
        "train", help="train one stage (stage 1: instruction tuning; stage 2: continue with AdamW or SAM)",
        description="Train one stage. Options left out come from --preset/--stage, else from train_stage's "
                    "defaults. Multi-process: torchrun --nproc_per_node N -m cfsam train ... or "
                    "accelerate launch --config_file configs/accelerate_fsdp.yaml -m cfsam train ... "
                    "(or accelerate_deepspeed_zero3.yaml)")
    t.add_argument("--preset", help="take defaults from a preset's stage1/stage2 section (smoke, cpu, paper)")
    t.add_argument("--stage", type=int, choices=(1, 2), help="which section of --preset")
    t.add_argument("--model", help="a model preset, or a model directory (stage 2: the stage-1 output)")
    t.add_argument("--dataset", help="a training set of cfsam.data (alpaca, sharegpt, open-platypus, ...)")
    t.add_argument("--out", help="output directory (default: $CFSAM_CACHE/stages/<stage id>, i.e. cached)")
    t.add_argument("--optimizer", choices=OPTIMIZERS)
    t.add_argument("--lr", type=float)
    t.add_argument("--epochs", type=float)
    t.add_argument("--batch-size", dest="batch_size", type=int, help="global examples per update")
    t.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per process per update")
    t.add_argument("--max-length", dest="max_length", type=int)
    t.add_argument("--n-train", dest="n_train", type=int, help="examples to train on (default: all)")
    t.add_argument("--seed", type=int)
    t.add_argument("--rho", type=float, help="SAM radius (paper: 2)")
    t.add_argument("--adaptive", action="store_true", default=None, help="ASAM instead of SAM")
    t.add_argument("--rehearsal", action="store_true",
                   help=f"mix stage-1 data into this stage (fraction: the preset's, else {DEFAULT_REHEARSAL_FRACTION})")
    t.add_argument("--rehearsal-from", dest="rehearsal_from",
                   help="the stage-1 dataset to replay (default: the preset's, else the one --model was trained on)")
    t.add_argument("--rehearsal-fraction", dest="rehearsal_fraction", type=float)
    t.add_argument("--warmup-ratio", dest="warmup_ratio", type=float)
    t.add_argument("--weight-decay", dest="weight_decay", type=float)
    t.add_argument("--lr-scheduler", dest="lr_scheduler", choices=SCHEDULERS)
    t.add_argument("--max-grad-norm", dest="max_grad_norm", type=float)
    t.add_argument("--precision", choices=PRECISIONS)
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help="steps between checkpoints (0: none)")
    t.add_argument("--log-every", dest="log_every", type=int)
    t.add_argument("--max-steps", dest="max_steps", type=int)
    t.add_argument("--dist", choices=DISTS, help="auto: from the launcher's environment")
    t.set_defaults(func=cmd_train)

    m = subparsers.add_parser("merge", help="Wise-FT: (1 - alpha) * stage 1 + alpha * stage 2")
    m.add_argument("stage1")
    m.add_argument("stage2")
    m.add_argument("--alpha", type=float, default=0.5)
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_merge)
