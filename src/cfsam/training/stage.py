"""One stage of continual instruction tuning: model + dataset + AdamW or SAM -> a trained model directory.

Why a short explicit loop and not ``transformers.Trainer``: SAM takes two forward/backward passes over
the same micro-batches with the weights moved in between, and the norm that sets the move must be
the norm of the whole gradient (accumulated over micro-batches, reduced over ranks). Trainer owns the
accumulation loop, the backward, clipping and the optimizer step (under FSDP/DeepSpeed accelerate
wraps the optimizer too), so SAM there means overriding ``training_step`` against its accumulation
counters; the paper's code ends up with three passes and per-shard norms. Here every pass is in
view (``optimizer_step``) and distribution is torch's own: DDP (``no_sync`` on all but the last
micro-batch) or FSDP2 ``fully_shard`` per decoder layer, whose DTensor gradients ``cfsam.core.sam.SAM``
reduces exactly. ``torchrun`` / ``accelerate launch`` only launch it: rank and world size come from
the environment (accelerate's FSDP plugin needs an accelerator, this runs on CPU as well).

DeepSpeed ZeRO-1/2/3 (``dist='zero1'|'zero2'|'zero3'``, or ``auto`` under an accelerate DeepSpeed
config): the engine owns the backward (gradients are reduced into per-rank partitions), the fp32
master weights, clipping and the step, so the same loop drives it through ``engine.backward`` /
``engine.step()`` and SAM moves the weights around the engine (``cfsam.training.zero.ZeroSAM``: global norm
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

import json
import logging
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from cfsam.core.dist import (
    Runtime,
    barrier,
    is_zero,
    setup_distributed,
    wrap_model,
)
from cfsam.core.errors import UsageError
from cfsam.core.io import write_json_atomic
from cfsam.core.sam import SAM
from cfsam.data import formatting, models, sources
from cfsam.training import zero
from cfsam.training.checkpoint import (
    CKPT_PREFIX,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_model,
    snapshot_name,
)
from cfsam.training.config import canonical, resolve, run_id
from cfsam.training.plan import Batches, Plan, plan_steps
from cfsam.training.step import (
    StepContext,
    TrainingDiverged,
    build_optimizer,
    optimizer_step,
)

log = logging.getLogger(__name__)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def default_dir(spec: dict) -> Path:
    """Where a stage's model is cached: ``$CFSAM_CACHE/runs/<run id>`` (the same for every road to it)."""
    return models.cache_dir() / "runs" / run_id(spec)


def train_stage(model, dataset, out_dir=None, *, keep_checkpoints: bool = False,
                callback: Callable[[dict], None] | None = None, **options) -> dict:
    """Train one stage and return its metrics (see the module docstring for files and semantics).

    ``model``: a model preset, a saved model directory, or the spec of the stage this one continues (trained
    first into its cache directory when it is not there yet). ``dataset``: a training-set name of
    ``cfsam.data`` or a tokenised ``datasets.Dataset`` (input_ids, labels). ``options``: the keys of
    ``cfsam.training.config.DEFAULTS`` (every default lives there), so ``train_stage(**spec)`` runs a spec.
    ``out_dir`` defaults to ``default_dir(spec)``. ``rehearsal_from`` with ``rehearsal_fraction`` mixes
    that share of stage-1 examples into this stage; with the same ``seed`` and a registry name they are
    drawn from the examples stage 1 trained on. ``callback(record)`` is called on every rank after each
    update (record: step, loss, norms, lr).

    ``dist``: auto (from the launcher's environment: FSDP2 under accelerate's FSDP config, DeepSpeed
    ZeRO of the configured stage under accelerate's DeepSpeed config, DDP with several processes, else
    none) | none | ddp | fsdp | zero1 | zero2 | zero3. ``precision``: fp32 | bf16 (autocast) | fp16
    (autocast + GradScaler; not with FSDP or ZeRO); weights and optimizer state stay fp32.
    ``max_grad_norm`` clips the applied gradient (SAM: the one at w + e) to that global norm.
    """
    spec = {"model": model, "dataset": dataset, **options}
    kw = resolve(spec)
    config = canonical(spec)
    sid = run_id(spec)
    out_dir = Path(out_dir) if out_dir is not None else default_dir(spec)
    done = out_dir / "metrics.json"
    if done.exists():
        metrics = _read_metrics(done)
        if metrics.get("run_id") == sid:
            _check_same_data(metrics, kw, out_dir)
            log.info("stage %s already trained in %s: reusing it", sid, out_dir)
            return metrics
        raise UsageError(f"{out_dir} holds a finished run of another config (run {metrics.get('run_id')}, "
                         f"this one is {sid}): use another out_dir or delete it")
    if isinstance(model, dict):  # continue a stage: train it first (or find it in the cache)
        parent = train_stage(**model)
        model = parent["out_dir"]
    grad_accum, max_grad_norm, precision, batch_size = (kw["grad_accum"], kw["max_grad_norm"], kw["precision"],
                                                        kw["batch_size"])
    rt = setup_distributed(kw["dist"])
    launcher_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_mp not in ("no", precision):
        log.warning("accelerate's mixed_precision=%s is not used: this stage runs precision=%s "
                    "(set cfsam's --precision instead)", launcher_mp, precision)
    if is_zero(rt.mode):  # the accelerate DeepSpeed config's own values; cfsam's options drive the engine
        for env, ours, flag in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", grad_accum, "--grad-accum"),
                                ("ACCELERATE_GRADIENT_CLIPPING", max_grad_norm, "--max-grad-norm")):
            if env in os.environ and os.environ[env] != str(ours).lower():
                log.warning("accelerate's %s=%s is not used: this stage runs %s %s", env, os.environ[env], flag, ours)
    if precision == "fp16" and (rt.mode == "fsdp" or is_zero(rt.mode)):
        raise UsageError(f"precision='fp16' is not supported with dist={rt.mode!r} here (its GradScaler would need "
                         "sharded inf checks); use precision='bf16'")
    micro_total = grad_accum * rt.world
    if batch_size % micro_total:
        raise UsageError(f"batch_size={batch_size} (global) must be a multiple of grad_accum * world_size = "
                         f"{grad_accum} * {rt.world}")
    try:
        return _run(model, dataset, out_dir, config=config, sid=sid, kw=kw, rt=rt,
                    keep_checkpoints=keep_checkpoints, callback=callback)
    finally:
        if rt.created_group:
            torch.distributed.destroy_process_group()


def _read_metrics(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is damaged ({err}): delete {path.parent} to retrain that stage") from err


def _check_same_data(metrics: dict, kw: dict, out_dir: Path) -> None:
    """A cached stage trained on other data files than the ones here is not this stage."""
    for key in ("dataset", "rehearsal_from"):
        name = kw.get(key)
        if not isinstance(name, str) or key == "rehearsal_from" and not kw["rehearsal_fraction"]:
            continue
        here, then = sources.file_hashes(name), (metrics.get("data_sha256") or {}).get(name)
        if then is not None and here != then:
            raise UsageError(f"{out_dir} was trained on other {name!r} files than the ones here "
                             f"({sources.data_dir() or 'the Hub'}): delete {out_dir} to retrain it")


def _load_data(dataset, tokenizer, kw) -> tuple:
    if isinstance(dataset, str):
        ds = formatting.build_dataset(dataset, tokenizer, n=kw["n_train"], seed=kw["seed"], max_length=kw["max_length"])
    else:
        ds = dataset if kw["n_train"] is None else dataset.select(range(min(kw["n_train"], len(dataset))))
        if kw["n_train"] is not None and len(dataset) < kw["n_train"]:
            raise UsageError(f"n_train={kw['n_train']} but the dataset has {len(dataset)} rows")
    info = {"dataset": dataset if isinstance(dataset, str) else "custom",
            "label": sources.label(dataset) if isinstance(dataset, str) else None, "n_stage": len(ds)}
    frac = kw["rehearsal_fraction"]
    if frac > 0:
        src = kw["rehearsal_from"]
        k = round(frac * len(ds) / (1.0 - frac))
        if isinstance(src, str):
            replay = formatting.build_dataset(src, tokenizer, n=max(k, 1), seed=kw["seed"], max_length=kw["max_length"])
        else:
            replay = src
        ds = formatting.mix_rehearsal(ds, replay, frac, seed=kw["seed"])
        info.update(rehearsal_from=src if isinstance(src, str) else "custom", rehearsal_fraction=frac,
                    rehearsal_label=sources.label(src) if isinstance(src, str) else None,
                    n_rehearsal=len(ds) - info["n_stage"])
    info["n_examples"] = len(ds)
    return ds.select_columns(["input_ids", "labels"]), info


def _optimizers(model, kw: dict, rt: Runtime, plan: Plan):
    """The wrapped model, its optimizer (SAM around its base, or the DeepSpeed engine's), the schedule, the
    fp16 GradScaler and the step's context."""
    model = wrap_model(model, rt)
    model.train()
    if is_zero(rt.mode):
        # the engine steps a plain AdamW (the client optimizer); SAM's two passes sit around the engine
        sched_opt = build_optimizer(model, "adamw", kw["lr"], kw["weight_decay"], kw["rho"], kw["adaptive"])
        model = zero.initialize(model, sched_opt, zero.engine_config(int(rt.mode[-1]), plan.micro, kw["grad_accum"],
                                                                     rt.world, kw["max_grad_norm"]))
        opt = (zero.ZeroSAM(model, rho=kw["rho"], adaptive=kw["adaptive"], every=kw["sam_every"])
               if kw["optimizer"] == "sam" else None)
    else:
        opt = build_optimizer(model, kw["optimizer"], kw["lr"], kw["weight_decay"], kw["rho"], kw["adaptive"],
                              sam_every=kw["sam_every"])
        sched_opt = opt.base_optimizer if isinstance(opt, SAM) else opt  # SAM steps through its base optimizer
    from transformers import get_scheduler

    sched = get_scheduler(kw["lr_scheduler"], sched_opt,
                          num_warmup_steps=math.ceil(kw["warmup_ratio"] * plan.total_steps),
                          num_training_steps=plan.total_steps)
    precision = kw["precision"]
    scaler = torch.amp.GradScaler(rt.device.type) if precision == "fp16" else None
    ctx = StepContext(world=rt.world, no_sync=model.no_sync if rt.mode == "ddp" else None,
                      autocast_dtype={"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
                      scaler=scaler, max_grad_norm=kw["max_grad_norm"], device_type=rt.device.type,
                      engine=model if is_zero(rt.mode) else None)
    return model, opt, sched, scaler, ctx


HISTORY = ("step", "loss", "grad_norm", "sam_grad_norm", "perturbation_norm", "lr", "skipped")  # per step


def _run(model_name_or_dir, dataset, out_dir: Path, *, config: dict, sid: str, kw: dict, rt: Runtime,
         keep_checkpoints: bool, callback) -> dict:
    """Set up, resume from the latest checkpoint if any, train to the end (saving snapshots and checkpoints
    on the way), then save the model and ``metrics.json``."""
    t_start = time.time()
    torch.manual_seed(kw["seed"])
    random.seed(kw["seed"])
    np.random.seed(kw["seed"])
    loaded = models.load_model(str(model_name_or_dir), dtype=torch.float32)
    tokenizer = loaded.tokenizer
    ds, data_info = _load_data(dataset, tokenizer, kw)
    plan = plan_steps(len(ds), kw, rt)
    total_steps = plan.total_steps
    model, opt, sched, scaler, ctx = _optimizers(loaded.model, kw, rt, plan)

    history = {**{k: [] for k in HISTORY}, "tokens": 0, "train_seconds": 0.0}
    start_step, resumed_from = 0, None
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt, sched, scaler, sid, rt)
        start_step, resumed_from, history = state["step"], state["step"], state["history"]
        log.info("resuming stage %s from %s (step %d of %d)", sid, ckpt, start_step, total_steps)
    last_ckpt = ckpt

    batches = Batches(ds, kw, rt, plan, tokenizer.pad_token_id)
    n_snap = kw["snapshots"]
    bar = tqdm(total=total_steps, initial=start_step, disable=rt.rank != 0, desc=f"train {kw['optimizer']}")
    t_loop = time.time()
    for step in range(start_step, total_steps):
        micro_batches, n_tokens, epoch = batches.at(step)
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
        for key in HISTORY:
            history[key].append(rec[key])
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if rt.rank == 0 and ((step + 1) % kw["log_every"] == 0 or step + 1 == total_steps):
            extra = f" perturbation {rec['perturbation_norm']:.3f}" if rec["perturbation_norm"] is not None else ""
            log.info("step %d/%d loss %.4f grad_norm %.3f%s lr %.3g", step + 1, total_steps, rec["loss"],
                     rec["grad_norm"], extra, lr_now)
        if callback is not None:
            callback(dict(rec))
        if step + 1 in plan.snapshot_at and step + 1 < total_steps:
            at = plan.snapshot_at[step + 1]
            save_model(model, rt, tokenizer, out_dir / snapshot_name(at, n_snap),
                       {"run_id": sid, "step": step + 1, "at": at, "of": n_snap})
        if kw["checkpoint_every"] and (step + 1) % kw["checkpoint_every"] == 0 and step + 1 < total_steps:
            history["train_seconds"] += time.time() - t_loop
            t_loop = time.time()
            last_ckpt = save_checkpoint(out_dir, step + 1, model, opt, sched, scaler, history, sid, rt)
    bar.close()
    history["train_seconds"] += time.time() - t_loop
    return _finish(model, tokenizer, out_dir, rt, history, plan, keep_checkpoints=keep_checkpoints,
                   run={"run_id": sid, "config": config, "data": data_info, "model_source": loaded.source,
                        "resumed_from_step": resumed_from, "t_start": t_start, "n_snap": n_snap, "kw": kw})


def _finish(model, tokenizer, out_dir: Path, rt: Runtime, history: dict, plan: Plan, *, keep_checkpoints: bool,
            run: dict) -> dict:
    """The trained model, then metrics.json (the marker of a finished run); the checkpoints go unless kept."""
    weights = save_model(model, rt, tokenizer, out_dir)
    peak, peak_kind = _peak_memory(rt.device)
    metrics = None
    if rt.rank == 0:
        metrics = {
            "run_id": run["run_id"], "status": "finished", "config": run["config"], "data": run["data"],
            "data_sha256": _data_sha256(run["kw"]),
            "model_source": run["model_source"], "out_dir": str(out_dir),
            "weights_hash": weights,
            "steps": history["step"], "loss": history["loss"], "grad_norm": history["grad_norm"],
            "sam_grad_norm": history["sam_grad_norm"], "perturbation_norm": history["perturbation_norm"],
            "lr": history["lr"], "skipped": history["skipped"], "final_loss": history["loss"][-1],
            "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "resumed_from_step": run["resumed_from_step"],
            "snapshots": {snapshot_name(i, run["n_snap"]): step for step, i in plan.snapshot_at.items()},
            "tokens": history["tokens"], "train_seconds": history["train_seconds"],
            "tokens_per_s": history["tokens"] / max(history["train_seconds"], 1e-9),
            "wall_seconds": time.time() - run["t_start"], "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
            "world_size": rt.world, "dist": rt.mode, "device": str(rt.device), "torch": torch.__version__,
        }
        write_json_atomic(out_dir / "metrics.json", metrics)
        if not keep_checkpoints:
            for old in out_dir.glob(CKPT_PREFIX + "*"):
                shutil.rmtree(old, ignore_errors=True)
        log.info("stage %s finished: %d steps, final loss %.4f, %s", run["run_id"], plan.total_steps,
                 metrics["final_loss"], out_dir)
    barrier(rt)
    if metrics is None:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    return metrics


def _data_sha256(kw: dict) -> dict:
    names = [kw[k] for k in ("dataset", "rehearsal_from") if isinstance(kw.get(k), str)]
    return {name: sources.file_hashes(name) for name in names}


