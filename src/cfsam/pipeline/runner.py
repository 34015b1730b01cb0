"""The runner: train or merge what an experiment needs, measure it, write its entry; ``run-missing``.

Under a multi-process launcher (torchrun, ``accelerate launch``; every ``cfsam batch --slurm`` job) all
ranks step through the same experiments together: the process group is made first, rank 0 alone takes
the file locks (one launch at a time per model and per result; a second ``run-missing`` on the same
cache waits, then finds the work done), every rank trains, every rank measures (the eval items are
shared among them), rank 0 writes, and only then does the next experiment start.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from filelock import FileLock
from tqdm.auto import tqdm

from cfsam.core.dist import init_group, local_device
from cfsam.core import memory
from cfsam.core.errors import RunFailed, UsageError
from cfsam.core.io import write_json_atomic
from cfsam.data import models, sources
from cfsam.pipeline import preflight, runs
from cfsam.pipeline.cache import check_known, datasets_of, entry_path, load_results, status_of
from cfsam.pipeline.preflight import unreachable
from cfsam.pipeline.presets import preset_name
from cfsam.pipeline.provenance import code_version, device_check, provenance
from cfsam.pipeline.specs import MEASURE_VERSION, expand, experiment_id, last_stage, needed, run_id, run_kind

log = logging.getLogger(__name__)

GROUP_TIMEOUT = timedelta(hours=12)  # rank 0 measures while the others wait at a barrier


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _from_rank0(value):
    """Rank 0's value on every rank (the ranks decide together)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _exclusive(path: Path):
    """One launch at a time holds ``path`` (its rank 0 takes the lock; its other ranks follow rank 0)."""
    lock = None
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    _barrier()
    try:
        yield
    finally:
        _barrier()
        if lock is not None:
            lock.release()


# -------------------------------------------------------------------------------------- models
def materialize(run: dict) -> tuple[str, dict | None]:
    """The model directory (or preset name) of a run, trained or merged first when not cached."""
    from cfsam.training.merge import wise_ft
    from cfsam.training.checkpoint import snapshot_name
    from cfsam.training.stage import default_dir, train_stage

    r = runs.parse(run)
    if isinstance(r, runs.Base):
        return r.model, None
    if isinstance(r, runs.WiseFT):
        s1, _ = materialize(r.stage1)
        s2, metrics = materialize(r.stage2)
        out = models.cache_dir() / "runs" / r.id()
        with _exclusive(out):
            _discard_if_damaged(out, "merge.json")
            if _rank() == 0:
                wise_ft(s1, s2, out, alpha=r.alpha)
        return str(out), {"stage2": metrics}
    if isinstance(r, runs.Snapshot):  # a model saved along a stage: train the stage with its snapshots
        stage = {**r.run, "snapshots": r.of}
        out = default_dir(stage) / snapshot_name(r.at, r.of) if r.at < r.of else None
        if out is not None:  # a damaged snapshot: its stage saves it again while it trains again
            with _exclusive(default_dir(stage)):
                _discard_if_damaged(out, "snapshot.json", whole=default_dir(stage))
        if out is not None and (default_dir(stage) / "metrics.json").exists() and not (out / "config.json").exists():
            # cached from a run that saved no snapshots (derived data): train it again, saving them
            log.warning("%s holds no %s: training that stage again to save its snapshots", default_dir(stage), out.name)
            if _rank() == 0:
                shutil.rmtree(default_dir(stage))
            _barrier()
        stage_dir, metrics = materialize(stage)
        return (str(out) if out is not None else stage_dir), metrics
    if isinstance(run["model"], dict):  # its parent first, under its own lock
        parent_dir, _ = materialize(run["model"])
        run = {**run, "model": parent_dir}
    out = default_dir(run)
    options = {k: v for k, v in run.items() if k not in ("model", "dataset")}  # checkpoint_every: the preset's
    with _exclusive(out):
        _discard_if_damaged(out, "metrics.json")
        metrics = train_stage(run["model"], run["dataset"], out, **options)
    return str(out), metrics


def _discard_if_damaged(folder: Path, marker: str, whole: Path | None = None) -> None:
    """A finished model (``marker`` written) whose files do not read, a truncated model.safetensors or a broken
    tokenizer, is never reused: rank 0 removes it (``whole``: the folder it was saved in, a snapshot's stage),
    so that it is trained or merged again. Headers only: no weights are loaded."""
    if _rank() == 0 and (folder / marker).exists():
        bad = models.damaged_model_file(folder)
        if bad is not None:
            log.warning("%s is damaged or missing: removing %s to compute it again", bad, whole or folder)
            shutil.rmtree(whole or folder)
    _barrier()


# ------------------------------------------------------------------------------------ measuring
def measure(model_ref: str, spec: dict) -> tuple[dict, torch.nn.Module]:
    """The held-out losses, the eval suite and (optionally) the landscape of one model, with wall times."""
    from cfsam.evaluation.harness import evaluate
    from cfsam.measurement import curvature, heldout, landscape

    loaded = models.load_model(model_ref)
    loaded.model.eval().to(local_device())  # every phase on the accelerator when there is one
    out: dict = {"heldout_loss": {}, "measure_seconds": {}}
    h = spec.get("heldout", {"datasets": [], "n": 0, "max_length": 256, "seed": 0})
    t = time.time()
    for ds in h["datasets"]:
        batches = heldout.heldout_batches(ds, loaded.tokenizer, n_examples=h["n"], batch_size=heldout.MEASURE_BATCH,
                                          max_length=h["max_length"], seed=h["seed"])
        per_example = heldout.per_example_losses(loaded.model, batches)  # [summed loss, tokens] each
        loss = sum(s for s, _ in per_example) / max(sum(n for _, n in per_example), 1)  # the token mean
        out["heldout_loss"][ds] = {"loss": loss, "n": len(per_example), "label": sources.label(ds),
                                   "per_example": [[s, n] for s, n in per_example]}
    out["measure_seconds"]["heldout"] = round(time.time() - t, 1)
    memory.release()
    t = time.time()
    ev = spec["eval"]
    out["eval"] = evaluate(loaded, ev["tasks"], limit=ev["limit"], seed=ev["seed"], stratify=bool(ev.get("stratified")))
    out["measure_seconds"]["eval"] = round(time.time() - t, 1)
    memory.release()
    if "landscape" in spec:
        t = time.time()
        ls = spec["landscape"]
        batches = landscape_batches(spec, loaded.tokenizer, rows=curvature.hvp_rows(local_device()))
        surfaces, summary = landscape.flatness_of(loaded.model, batches, ls)
        out["landscape"] = {"flatness": summary,
                            "surfaces": [_jsonable(dataclasses.asdict(s)) for s in surfaces],
                            "curvature": curvature.curvature_of(loaded.model, batches, ls)}
        out["measure_seconds"]["landscape"] = round(time.time() - t, 1)
    return out, loaded.model


def landscape_batches(spec: dict, tokenizer, rows: int | None = None) -> list:
    """The batches a measurement spec's landscape and curvature run on; with ``rows``, the same examples longest
    first in batches of that many rows (``heldout.by_length``). Every landscape and curvature quantity is a token
    sum over examples, so only the summation order moves. The spec's one batch of 8 is about half padding: sorted,
    a forward and a gradient cost a fifth less; the Hessian-vector products, most of the phase, do not change,
    since their cost is per pass, not per token (benchmarks/records/2026-12-06-bench_endpoint-smollm2.txt)."""
    from cfsam.measurement import heldout

    h = spec.get("heldout", {"datasets": [], "n": 0, "max_length": 256, "seed": 0})
    ls = spec["landscape"]
    # disjoint: flatness on examples other than those that measure forgetting
    skip = h["n"] if ls.get("disjoint") and ls["dataset"] in h["datasets"] else 0
    batches = heldout.heldout_batches(ls["dataset"], tokenizer, n_examples=ls["n_examples"],
                                      batch_size=ls["batch_size"], max_length=h["max_length"], seed=h["seed"], skip=skip)
    return batches if rows is None else heldout.by_length(batches, rows)[1]


def _jsonable(d: dict) -> dict:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in d.items()}


def run_one(preset: str, name: str, exp: dict | None = None) -> dict | None:
    """Materialise and measure one experiment; rank 0 writes its entry. Skips one that another process
    finished meanwhile (the lock on the entry is held while measuring)."""
    exp = exp or expand(preset)[name]
    started = time.time()
    code_version()  # before any work
    log.info("experiment %s/%s: materialising its %s run", preset, name, run_kind(exp["run"]))
    model_ref, train_metrics = materialize(exp["run"])
    memory.release()  # the trainer's model, optimizer state and activations are gone: so are their pages
    path = entry_path(preset, name)
    entry = None
    with _exclusive(models.cache_dir() / "locks" / preset_name(preset) / name):  # in the cache, not results/
        if _from_rank0(_rank() == 0 and status_of(preset, name, exp) != "ok"):
            # every rank measures: the eval items are shared among them (the harness gathers the scores)
            if _rank() == 0:
                log.info("experiment %s/%s: measuring %s", preset, name, model_ref)
            measured, model = measure(model_ref, exp["measure"])
            if _rank() == 0:
                entry = {"id": experiment_id(exp), "name": name, "preset": preset_name(preset), "spec": exp,
                         "measure_version": MEASURE_VERSION,
                         "data_labels": {d: sources.label(d) for d in sorted(datasets_of(exp))},
                         "train": train_metrics, **measured}
                entry["provenance"] = provenance(started, time.time(), exp, model)
                write_json_atomic(path, entry)
                path.with_name(f"{name}.json").unlink(missing_ok=True)  # a stale plain entry it replaces
            del model, measured
        elif _rank() == 0:
            log.info("experiment %s/%s: finished by another process meanwhile", preset, name)
    memory.release()  # a model and its eval caches must not outlive their experiment, nor their pages
    return entry


def groups(exps: dict[str, dict], names: list[str]) -> list[list[str]]:
    """The names, grouped by the training run they measure (a run's snapshots, the Wise-FT merges of its
    tuned side; base models by model), groups and members in their first order: one worker per group
    trains each run once and measures it along the way."""
    out: dict[str, list[str]] = {}
    for name in names:
        last = last_stage(exps[name]["run"])
        out.setdefault(run_id(last) if last is not None else f"base:{exps[name]['run'].get('model')}", []).append(name)
    return list(out.values())


def _worker_init(threads: int, level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    torch.set_num_threads(threads)


def _run_group(preset: str, exps: dict[str, dict], names: list[str]) -> dict[str, str]:
    """A worker's share: the group's experiments in order; the ones that failed (logged) come back, each
    with its error."""
    failed = {}
    for name in names:
        try:
            run_one(preset, name, exps[name])
        except Exception as err:  # one broken experiment must not stop the other workers' runs
            log.exception("experiment %s/%s failed", preset, name)
            failed[name] = _one_line(err)
    return failed


def _run_parallel(preset: str, exps: dict, todo: list[str], workers: int) -> dict[str, str]:
    """Several experiments at once on one machine: on a GPU that one small model leaves mostly idle.
    Each worker takes the next group of experiments (one training run and its measurements); runs that
    groups share (stage 1) are trained once, under the cache's locks, while the others wait for them.
    Returns the experiments that failed, with their errors."""
    import concurrent.futures
    import multiprocessing

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("workers > 1 runs experiments side by side in one process group's place; "
                         "under a multi-process launcher use workers=1")
    todo_groups = groups(exps, todo)
    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("%d experiments in %d groups on %d workers (%d threads each)", len(todo), len(todo_groups), workers,
             threads)
    failed: dict[str, str] = {}
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_worker_init,
                                                initargs=(threads, logging.getLogger().getEffectiveLevel())) as pool:
        jobs = [pool.submit(_run_group, preset, {n: exps[n] for n in g}, g) for g in todo_groups]
        for job in tqdm(concurrent.futures.as_completed(jobs), total=len(jobs), desc=f"run groups ({preset})"):
            failed.update(job.result())
    return failed


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0][:500]


# ------------------------------------------------------------------------------------ run-missing
@dataclasses.dataclass
class Summary:
    """What one ``run-missing`` did with the experiments it was asked for."""
    preset: str
    computed: list[str] = dataclasses.field(default_factory=list)
    current: list[str] = dataclasses.field(default_factory=list)  # already in the cache, current
    unreachable: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why its data/model is not here
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> the error (should have worked)

    def lines(self) -> list[str]:
        """The summary a user reads last: the counts, then each reason with the command to run elsewhere."""
        out = [f"run-missing --preset {self.preset}: computed {len(self.computed)}, already current "
               f"{len(self.current)}, not computable here {len(self.unreachable)}, failed {len(self.failed)}"]
        by_reason: dict[str, list[str]] = {}
        for name, why in self.unreachable.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            out += [f"not computable here ({len(names)}): {why}",
                    f"  where the data and models are: cfsam run-missing --preset {self.preset} --only {','.join(names)}"]
        for name, err in self.failed.items():
            out.append(f"FAILED {name}: {err}")
        return out


def _plan(preset: str, notebooks: list[str] | None, only: list[str] | None) -> tuple[dict, list[str], dict, list[str]]:
    """The experiments, the names asked for, their cache status, and those to compute (grouped by run)."""
    exps = expand(preset)  # a bad preset fails here, before anything runs
    device_check()  # and a failed device self-check
    names = only or needed(preset, notebooks)
    check_known(preset, names, exps)
    status = load_results(preset, names)
    # experiments that measure one training run go one after another (headline first, as listed): a run
    # is trained once while its cache lives, which on a machine that a session lends is that session only
    todo = [n for g in groups(exps, [n for n in names if status[n]["status"] != "ok"]) for n in g]
    log.info("preset %s: %d experiments needed, %d to run", preset, len(names), len(todo))
    return exps, names, status, todo


def compute_missing(preset: str, notebooks: list[str] | None = None, only: list[str] | None = None,
                    workers: int = 1, echo=print) -> Summary:
    """Compute every needed experiment that is missing, stale or damaged and can be computed here. One whose
    data or model cannot be had here is skipped with one line (``echo``) saying which and why; one that fails
    is logged and the others still run (under a multi-process launcher the first failure stops them all: the
    ranks must stay in step). The Summary says what was computed, current, not computable here, or failed."""
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers={workers!r}; it must be a positive number of processes")
    exps, names, status, todo = _plan(preset, notebooks, only)
    summary = Summary(preset, current=[n for n in names if status[n]["status"] == "ok"])
    seen: dict = {}
    for name in todo:
        why = unreachable(exps[name], seen)
        if why:
            summary.unreachable[name] = why
            if _rank() == 0:
                echo(f"skipped {name}: not computable here: {why}")
    todo = [n for n in todo if n not in summary.unreachable]
    preflight.check(preset, exps, todo)  # what would stop the run part way, before its first experiment
    if workers > 1 and len(todo) > 1:
        summary.failed = _run_parallel(preset, exps, todo, workers)
        summary.computed = [n for n in todo if n not in summary.failed]
        return summary
    created, group = False, int(os.environ.get("WORLD_SIZE", "1")) > 1
    if group and not dist.is_initialized():
        # before any lock: a rank waiting on a lock must never be what another rank's collective waits for
        init_group(GROUP_TIMEOUT)
        created = True
    try:
        for name in tqdm(todo, desc=f"experiments ({preset})", disable=_rank() != 0):
            if group:
                run_one(preset, name, exps[name])
                summary.computed.append(name)
                continue
            try:
                run_one(preset, name, exps[name])
                summary.computed.append(name)
            except (sources.DataUnavailable, models.ModelUnavailable) as err:
                if isinstance(err, models.DamagedModelFile):
                    log.exception("experiment %s/%s failed", preset, name)
                    summary.failed[name] = _one_line(err)
                else:  # found only on the way (a set read late): as one found before
                    summary.unreachable[name] = str(err)
                    echo(f"skipped {name}: not computable here: {err}")
            except Exception as err:  # one broken experiment must not stop the ones after it
                log.exception("experiment %s/%s failed", preset, name)
                summary.failed[name] = _one_line(err)
    finally:
        if created:
            dist.destroy_process_group()
    return summary


def run_missing(preset: str, notebooks: list[str] | None = None, only: list[str] | None = None,
                dry_run: bool = False, workers: int = 1) -> list[str]:
    """Run every needed experiment that is missing, stale or damaged; return the names computed (dry run:
    those it would try). ``workers`` > 1 runs that many groups of them side by side on this machine (see
    ``_run_parallel``). Experiments that cannot be computed here are skipped (``compute_missing``); if any
    failed, RuntimeError names them after the others ran."""
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers={workers!r}; it must be a positive number of processes")
    if dry_run:
        _, _, status, todo = _plan(preset, notebooks, only)
        for n in todo:
            print(f"{status[n]['status']:8s} {n}")
        return todo
    summary = compute_missing(preset, notebooks, only, workers, echo=log.warning)
    if summary.failed:
        raise RunFailed(f"{len(summary.failed)} experiment(s) failed (see the log): {', '.join(summary.failed)}")
    return summary.computed
