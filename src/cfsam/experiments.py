"""Experiments and the results cache.

An *experiment* is one model state (a *run*: base, stage 1, stage 2 with AdamW or SAM, Wise-FT, ...)
and what is measured on it (the eval suite, held-out losses, optionally the loss landscape). Its spec
is a plain dict derived from a preset; its id is a hash of the spec, of the data files it reads and of
the package version. Results live in ``results/<preset>/<name>.json``: small, in git, written atomically
as each experiment finishes. An entry whose id no longer matches its spec is *stale*: reported, never
reused. Models and checkpoints live outside git, in ``$CFSAM_CACHE/runs/<run-id>/``; a stage-1 model is
trained once and reused by every stage-2 run that starts from it.

Notebooks call ``load_results`` / ``frame``; ``run_missing`` computes what they need.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from . import __version__, data
from .io import config_hash, write_json_atomic
from .models import cache_dir
from .presets import load_preset

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# Notebooks, in book order, and the experiments each reads (names produced by `experiments(preset)`).
NOTEBOOKS = ["results", "fig1", "tab1", "tab2a", "tab2b", "tab2c", "tab3", "tab4", "tab5", "tab6", "tab7", "tab8",
             "rho_sweep", "flatness_vs_forgetting", "sam_cost"]


def results_dir(preset: str) -> Path:
    root = Path(os.environ.get("CFSAM_RESULTS", REPO / "results"))
    return root / preset


# ------------------------------------------------------------------------------------ run specs
def _stage1(p: dict, model: str) -> dict:
    s = p["stage1"]
    return {"kind": "stage1", "model": model, "dataset": p["data"]["stage1"], "n": p["data"]["n_stage1"],
            "optimizer": s["optimizer"], "lr": s["lr"], "epochs": s["epochs"], "batch_size": s["batch_size"],
            "grad_accum": s["grad_accum"], "max_length": p["max_length"], "seed": p["seed"]}


def _stage2(p: dict, parent: dict, dataset: str, optimizer: str, *, epochs=None, rho=None, adaptive=None,
            rehearsal: float = 0.0) -> dict:
    s = p["stage2"]
    spec = {"kind": "stage2", "parent": parent, "dataset": dataset, "n": p["data"]["n_stage2"],
            "optimizer": optimizer, "lr": s["lr"], "batch_size": s["batch_size"], "grad_accum": s["grad_accum"],
            "epochs": epochs if epochs is not None else s["epochs_adamw" if optimizer == "adamw" else "epochs_sam"],
            "max_length": p["max_length"], "seed": p["seed"], "rehearsal": rehearsal}
    if rehearsal:
        spec["rehearsal_dataset"] = p["data"]["stage1"]
    if optimizer == "sam":
        spec["rho"] = s["rho"] if rho is None else rho
        spec["adaptive"] = s["adaptive"] if adaptive is None else adaptive
    return spec


def experiments(preset: str | dict) -> dict[str, dict]:
    """Every named experiment of a preset: {name: {"run": run spec, "measure": what to measure}}."""
    p = load_preset(preset) if isinstance(preset, str) else preset
    heldout = {"datasets": [p["data"]["stage1"]], "n": p["data"]["n_heldout"], "max_length": p["max_length"],
               "seed": p["seed"]}
    ev = {"tasks": list(p["eval"]["tasks"]), "limit": p["eval"]["limit"], "seed": p["seed"]}
    land = dict(p["landscape"])
    out: dict[str, dict] = {}

    def add(name, run, landscape=False, sets=()):
        measure = {"eval": ev, "heldout": {**heldout, "datasets": heldout["datasets"] + [s for s in sets
                                                                                          if s not in heldout["datasets"]]}}
        if landscape:
            measure["landscape"] = land
        out[name] = {"run": run, "measure": measure}

    stage2_sets = p["data"]["stage2"]
    for model in [p["model"]] + [m for m in p["sizes"] if m != p["model"]]:
        prefix = "" if model == p["model"] else f"{model}/"
        base, s1 = {"kind": "base", "model": model}, _stage1(p, model)
        add(prefix + "base", base, sets=stage2_sets if not prefix else ())
        add(prefix + "stage1", s1, landscape=not prefix, sets=stage2_sets if not prefix else ())
        datasets_here = stage2_sets if not prefix else ["open-platypus"]
        for ds in datasets_here:
            for opt in ("adamw", "sam"):
                add(f"{prefix}s2-{ds}-{opt}", _stage2(p, s1, ds, opt),
                    landscape=not prefix and (opt == "adamw" or ds == "open-platypus"), sets=[ds])
            if not prefix:
                add(f"s2-{ds}-adamw-e1", _stage2(p, s1, ds, "adamw", epochs=1), sets=[ds])
        if prefix:
            continue
        op = "open-platypus"
        for opt in ("adamw", "sam"):
            add(f"wiseft-{op}-{opt}", {"kind": "wise_ft", "stage1": s1, "stage2": _stage2(p, s1, op, opt),
                                       "alpha": p["wise_ft"]["alpha"]}, sets=[op])
            add(f"rehearsal-{op}-{opt}", _stage2(p, s1, op, opt, rehearsal=p["rehearsal"]["fraction"]), sets=[op])
        for rho in p["rho_sweep"]:
            for adaptive in (False, True):
                name = f"s2-{op}-{'asam' if adaptive else 'sam'}-rho{rho:g}"
                run = _stage2(p, s1, op, "sam", rho=rho, adaptive=adaptive)
                if run != out[f"s2-{op}-sam"]["run"]:
                    add(name, run, sets=[op])
    return out


def needed(preset: str | dict, notebooks: list[str] | None = None) -> list[str]:
    """Experiment names the given notebooks read (all of the preset's when None)."""
    names = list(experiments(preset))
    if notebooks is None:
        return names
    bad = [n for n in notebooks if n not in NOTEBOOKS]
    if bad:
        raise ValueError(f"unknown notebook(s) {', '.join(bad)}; allowed: {', '.join(NOTEBOOKS)}")
    keep: set[str] = set()
    for nb in notebooks:
        keep |= set(notebook_experiments(nb, names))
    return [n for n in names if n in keep]


def notebook_experiments(notebook: str, names: list[str]) -> list[str]:
    core = {"base", "stage1"}
    def s2(ds, *opts):
        return {f"s2-{ds}-{o}" for o in opts}
    stage2_sets = sorted({n.split("-", 1)[1].rsplit("-", 1)[0] for n in names if n.startswith("s2-") and
                          n.endswith("-adamw")})
    table = {
        "fig1": {"stage1"} | s2("open-platypus", "adamw") | s2("auto-wiki", "adamw"),
        "tab2a": core | set().union(*(s2(d, "adamw", "sam") for d in stage2_sets)),
        "tab2b": {n for n in names if "/" in n} | core | s2("open-platypus", "adamw", "sam"),
        "tab2c": core | s2("open-platypus", "adamw", "sam") | {n for n in names if n.startswith(("wiseft-",
                                                                                                    "rehearsal-"))},
        "tab3": core | set().union(*(s2(d, "adamw", "sam", "adamw-e1") for d in stage2_sets)),
        "tab4": core | s2("open-platypus", "adamw", "sam"),
        "rho_sweep": core | s2("open-platypus", "adamw", "sam") | {n for n in names if "-rho" in n},
        "flatness_vs_forgetting": set(names) - {n for n in names if "/" in n},
        "sam_cost": {n for n in names if n.startswith("s2-")},
        "results": set(names),
    }
    table["tab1"] = table["fig1"]
    table.update(tab5=table["tab3"], tab6=table["tab2b"], tab7=table["tab2c"], tab8=table["tab2c"])
    return [n for n in names if n in table[notebook]]


# ----------------------------------------------------------------------------------- identities
def _datasets_of(spec) -> set[str]:
    found = set()
    if isinstance(spec, dict):
        for k, v in spec.items():
            if k in ("dataset", "rehearsal_dataset") and isinstance(v, str):
                found.add(v)
            elif k == "datasets" and isinstance(v, list):
                found |= set(v)
            else:
                found |= _datasets_of(v)
    return found


def data_hashes(spec: dict) -> dict[str, dict]:
    """sha256 of every data file an experiment reads; sets of many files (MMLU) as one digest of them."""
    from . import tasks

    def compact(files: dict) -> dict:
        if len(files) <= 4:
            return files
        return {f"{len(files)} files": config_hash(files, 64)}

    out = {name: compact(data.file_hashes(name)) for name in sorted(_datasets_of(spec))}
    for task in spec.get("measure", {}).get("eval", {}).get("tasks", []):
        out[f"task:{task}"] = compact(tasks.data_hashes(task))
    return out


def run_id(run: dict) -> str:
    return config_hash({"run": run, "data": {d: data.file_hashes(d) for d in sorted(_datasets_of(run))}})


def experiment_id(exp: dict) -> str:
    """Hash of the spec, the data files it reads, and the package's major.minor version."""
    return config_hash({"spec": exp, "data": data_hashes(exp), "cfsam": __version__.rsplit(".", 1)[0]})


# -------------------------------------------------------------------------------------- cache
def load_results(preset: str, names: list[str] | None = None) -> dict[str, dict]:
    """Cached entries by name, each with a ``status``: ok, stale (spec or data changed) or missing."""
    exps = experiments(preset)
    out = {}
    for name in names or list(exps):
        if name not in exps:
            raise ValueError(f"unknown experiment {name!r} in preset {preset!r}; allowed: {', '.join(exps)}")
        path = results_dir(preset) / f"{name}.json"
        if not path.exists():
            out[name] = {"name": name, "status": "missing", "command": missing_command(preset, name)}
            continue
        entry = json.loads(path.read_text())
        current = experiment_id(exps[name])
        entry["status"] = "ok" if entry.get("id") == current else "stale"
        if entry["status"] == "stale":
            log.warning("result %s is stale (cached id %s, current %s): recompute with %s", path, entry.get("id"),
                        current, missing_command(preset, name))
            entry["command"] = missing_command(preset, name)
        out[name] = entry
    return out


def missing_command(preset: str, name: str) -> str:
    return f"cfsam run-missing --preset {preset} --only {name}"


def provenance(started: float, ended: float, exp: dict, model=None) -> dict:
    import torch

    from .models import weights_hash

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cfsam_version": __version__, "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "data": data_hashes(exp),
        "model_weights_hash": weights_hash(model) if model is not None else None,
        "machine": {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
        "start": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "end": datetime.fromtimestamp(ended, timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(ended - started, 1),
    }


# -------------------------------------------------------------------------------------- running
def materialize(run: dict) -> tuple[str, dict | None]:
    """The model directory (or preset name) of a run, training/merging it first if not cached."""
    kind = run["kind"]
    if kind == "base":
        return run["model"], None

    out = cache_dir() / "runs" / run_id(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Slurm jobs of several notebooks may need the same stage-1 model at once: one trains, the others wait.
    with FileLock(str(out) + ".lock"):
        return _materialize(run, kind, out)


def _materialize(run: dict, kind: str, out: Path) -> tuple[str, dict | None]:
    from . import merge, train

    if kind == "wise_ft":
        s1, _ = materialize(run["stage1"])
        s2, metrics = materialize(run["stage2"])
        merge.wise_ft(s1, s2, out, alpha=run["alpha"])
        return str(out), {"stage2": metrics}
    if kind == "stage1":
        start = run["model"]
    elif kind == "stage2":
        start, _ = materialize(run["parent"])
    else:
        raise ValueError(f"unknown run kind {kind!r}; allowed: base, stage1, stage2, wise_ft")
    metrics = train.train_stage(
        start, run["dataset"], out, optimizer=run["optimizer"], lr=run["lr"], epochs=run["epochs"],
        batch_size=run["batch_size"], grad_accum=run["grad_accum"], max_length=run["max_length"], n_train=run["n"],
        seed=run["seed"], rho=run.get("rho", 2.0), adaptive=run.get("adaptive", False),
        rehearsal_from=run.get("rehearsal_dataset"), rehearsal_fraction=run.get("rehearsal", 0.0))
    return str(out), metrics


def measure(model_ref: str, spec: dict) -> dict:
    """The eval suite, held-out losses and (optionally) the landscape of one model."""
    from . import evaluate, landscape
    from .models import load_model

    loaded = load_model(model_ref)
    loaded.model.eval()
    out: dict = {}
    h = spec["heldout"]
    out["heldout_loss"] = {}
    for ds in h["datasets"]:
        batches = landscape.heldout_batches(ds, loaded.tokenizer, n_examples=h["n"], batch_size=8,
                                            max_length=h["max_length"], seed=h["seed"])
        out["heldout_loss"][ds] = {"loss": landscape.mean_loss(loaded.model, batches), "n": h["n"],
                                   "label": data.label(ds)}
    ev = spec["eval"]
    res = evaluate.evaluate(loaded, ev["tasks"], limit=ev["limit"], seed=ev["seed"])
    out["eval"] = res
    if "landscape" in spec:
        ls = spec["landscape"]
        batches = landscape.heldout_batches(ls["dataset"], loaded.tokenizer, n_examples=ls["n_examples"],
                                            batch_size=ls["batch_size"], max_length=h["max_length"], seed=h["seed"])
        surfaces, summary = landscape.flatness_over_seeds(loaded.model, batches, seeds=ls["seeds"], n=ls["grid"],
                                                          span=ls["span"], filter_norm=ls["filter_norm"])
        out["landscape"] = {"flatness": summary, "surfaces": [_jsonable(dataclasses.asdict(s)) for s in surfaces],
                            "curvature": landscape.curvature(loaded.model, batches, iters=ls["hessian_iters"],
                                                            probes=ls["hutchinson_probes"])}
    return out, loaded.model


def _jsonable(d: dict) -> dict:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in d.items()}


def run_one(preset: str, name: str) -> dict:
    exp = experiments(preset)[name]
    started = time.time()
    log.info("experiment %s/%s: materialising %s run", preset, name, exp["run"]["kind"])
    model_ref, train_metrics = materialize(exp["run"])
    if _rank() != 0:  # under torchrun/accelerate every rank trains; rank 0 alone measures and writes
        return {}
    log.info("experiment %s/%s: measuring %s", preset, name, model_ref)
    measured, model = measure(model_ref, exp["measure"])
    entry = {"id": experiment_id(exp), "name": name, "preset": preset, "spec": exp,
             "data_labels": {d: data.label(d) for d in sorted(_datasets_of(exp))},
             "train": train_metrics, **measured}
    entry["provenance"] = provenance(started, time.time(), exp, model)
    write_json_atomic(results_dir(preset) / f"{name}.json", entry)
    return entry


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_missing(preset: str, notebooks: list[str] | None = None, only: list[str] | None = None,
                dry_run: bool = False) -> list[str]:
    """Run every needed experiment that is missing or stale; return their names."""
    names = only or needed(preset, notebooks)
    status = load_results(preset, names)
    todo = [n for n in names if status[n]["status"] != "ok"]
    log.info("preset %s: %d experiments needed, %d to run", preset, len(names), len(todo))
    if dry_run:
        for n in todo:
            print(f"{status[n]['status']:8s} {n}")
        return todo
    for name in tqdm(todo, desc=f"experiments ({preset})"):
        run_one(preset, name)
    return todo


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("run-missing", help="run the experiments of a preset that the cache lacks")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--notebooks", help="comma-separated notebook names (default: all)")
    p.add_argument("--only", help="comma-separated experiment names")
    p.add_argument("--dry-run", action="store_true", help="list what would run")
    p.set_defaults(func=lambda a: run_missing(a.preset, a.notebooks.split(",") if a.notebooks else None,
                                              a.only.split(",") if a.only else None, a.dry_run) and 0)
    s = subparsers.add_parser("status", help="cached, stale and missing experiments of a preset")
    s.add_argument("--preset", default="cpu")
    s.set_defaults(func=_status)


def _status(args) -> int:
    for name, entry in load_results(args.preset).items():
        wall = entry.get("provenance", {}).get("wall_s")
        print(f"{entry['status']:8s} {name:36s} {'' if wall is None else f'{wall:8.0f} s'}")
    return 0
