"""A stage's spec: the trainer's options, their defaults (the one place they live) and their validation.

A *stage spec* is one mapping whose keys are ``train_stage``'s arguments: ``model`` (a model preset, a
saved model directory, or the spec of the stage it continues), ``dataset`` (a training set of
``cfsam.data``), and the options of ``DEFAULTS``. Presets, ``cfsam train`` and ``run-missing`` all build
this same mapping; ``run_id`` hashes what changes the trained weights, so the same stage gets the same
id and the same cached model wherever it was asked for and wherever the cache sits. Ids never depend on
paths: a directory is known by the id in its ``metrics.json``/``merge.json``, else by its weights' hash.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from cfsam.core import registry
from cfsam.core.defaults import DEFAULT_RHO
from cfsam.core.errors import UsageError
from cfsam.core.io import config_hash

OPTIMIZERS = ("adamw", "sam")
DISTS = ("auto", "none", "ddp", "fsdp", "zero1", "zero2", "zero3")  # zeroN: DeepSpeed ZeRO stage N
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")

DEFAULTS = {
    "optimizer": "adamw",
    "lr": 1e-4,
    "epochs": 1.0,
    "batch_size": 8,          # global examples per optimizer step
    "grad_accum": 1,          # micro-batches per process per step
    "max_length": 256,
    "n_train": None,          # examples of the training set (None: all)
    "seed": 1234,
    "rho": DEFAULT_RHO,       # SAM radius (the paper's 2); SAM only
    "adaptive": False,        # ASAM; SAM only
    "sam_every": 1,           # SAM step every k optimizer steps, plain steps between; SAM only
    "rehearsal_from": None,   # the stage-1 set to replay
    "rehearsal_fraction": 0.0,
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "lr_scheduler": "cosine",
    "max_grad_norm": 1.0,     # as transformers.Trainer; None: no clipping
    "precision": "fp32",
    "max_steps": None,        # caps epochs
    "group_by_length": False,  # batches of similar lengths (less padding), in a seeded order
    "snapshots": 0,           # n > 1: also save the model at n - 1 evenly spaced steps before the end
    "checkpoint_every": 0,    # steps between checkpoints (0: none)
    "log_every": 10,
    "dist": "auto",
}
# what each option is, for the CLI's flags (``cfsam train``, generated from DEFAULTS: they cannot drift), with
# the type of those whose default is None and the choices of those that take one of a few names
HELP = {
    "optimizer": "adamw or sam (with --adaptive: ASAM)", "lr": "peak learning rate", "epochs": "passes over the data",
    "batch_size": "global examples per update", "grad_accum": "micro-batches per process per update",
    "max_length": "tokens per example (longer ones are cut)", "n_train": "examples to train on (default: all)",
    "seed": "data order and initialisation", "rho": "SAM radius (the paper's 2)", "adaptive": "ASAM instead of SAM",
    "sam_every": "a SAM step every k steps, plain steps between (1: SAM)",
    "rehearsal_from": "the stage-1 set to replay (default: the preset's, else the one --model was trained on)",
    "rehearsal_fraction": "share of replayed stage-1 examples", "warmup_ratio": "share of steps warming up",
    "weight_decay": "AdamW's weight decay", "lr_scheduler": "the learning-rate schedule",
    "max_grad_norm": "gradient clipping norm", "precision": "fp32, or bf16/fp16 autocast",
    "max_steps": "stop after this many updates (caps epochs)", "group_by_length": "batches of similar lengths",
    "snapshots": "n > 1: also save the model at n - 1 evenly spaced steps before the end",
    "checkpoint_every": "steps between checkpoints (0: none)", "log_every": "steps between log lines",
    "dist": "auto: from the launcher's environment",
}
TYPES = {"n_train": int, "rehearsal_from": str, "max_steps": int, "max_grad_norm": float}
CHOICES = {"optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS, "precision": PRECISIONS, "dist": DISTS}
RUNTIME_KEYS = ("checkpoint_every", "log_every", "dist", "snapshots")  # how a stage runs, not what it trains
SAM_KEYS = ("rho", "adaptive", "sam_every")
REHEARSAL_KEYS = ("rehearsal_from", "rehearsal_fraction")
# options added after the first ids: left out of the id at the value that reproduces the behaviour before them
ADDED_LATER = {"group_by_length": False}
DEFAULT_REHEARSAL_FRACTION = 0.1  # `cfsam train --rehearsal` without a fraction


class SpecError(UsageError):
    """An unknown option or an impossible value, named with what is allowed."""


def resolve(spec: dict) -> dict:
    """The spec completed with every default and validated; raises SpecError before any work."""
    allowed = ("model", "dataset", *DEFAULTS)
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise SpecError(f"unknown stage option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    for key in ("model", "dataset"):
        if spec.get(key) is None:
            raise SpecError(f"a stage needs {key!r} (model: a model preset, a model directory or the spec of the "
                            f"stage it continues; dataset: one of {', '.join(train_sets())})")
    out = {**DEFAULTS, **spec}
    validate(out)
    return out


def validate(kw: dict) -> None:
    def bad(name, allowed):
        raise SpecError(f"{name}={kw[name]!r}; allowed: {allowed}")

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def integer(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if kw["optimizer"] not in OPTIMIZERS:
        bad("optimizer", " | ".join(OPTIMIZERS))
    for name in ("lr", "epochs"):
        if not (number(kw[name]) and kw[name] > 0):
            bad(name, "a finite number > 0")
    for name in ("batch_size", "grad_accum", "log_every", "sam_every"):
        if not (integer(kw[name]) and kw[name] >= 1):
            bad(name, "an integer >= 1")
    if not (integer(kw["max_length"]) and kw["max_length"] >= 8):
        bad("max_length", "an integer >= 8")
    for name in ("n_train", "max_steps"):
        if kw[name] is not None and not (integer(kw[name]) and kw[name] >= 1):
            bad(name, "None or an integer >= 1")
    if not (integer(kw["checkpoint_every"]) and kw["checkpoint_every"] >= 0):
        bad("checkpoint_every", "an integer >= 0 (0: no checkpoints)")
    if kw["batch_size"] % kw["grad_accum"]:
        raise SpecError(f"batch_size={kw['batch_size']} (global) must be a multiple of grad_accum={kw['grad_accum']}")
    if kw["n_train"] is not None and kw["n_train"] < kw["batch_size"]:
        raise SpecError(f"n_train={kw['n_train']} is fewer than one batch (batch_size={kw['batch_size']})")
    if not (number(kw["rho"]) and kw["rho"] > 0):
        bad("rho", "a finite number > 0 (SAM's radius; the paper uses 2)")
    for name in ("adaptive", "group_by_length"):
        if not isinstance(kw[name], bool):
            bad(name, "true or false")
    if not (integer(kw["snapshots"]) and kw["snapshots"] >= 0):
        bad("snapshots", "an integer >= 0 (n > 1: models at n - 1 points before the end)")
    if not (number(kw["rehearsal_fraction"]) and 0.0 <= kw["rehearsal_fraction"] < 1.0):
        bad("rehearsal_fraction", "0 <= fraction < 1")
    if kw["rehearsal_fraction"] > 0 and kw["rehearsal_from"] is None:
        raise SpecError(f"rehearsal_fraction={kw['rehearsal_fraction']} needs rehearsal_from (the stage-1 dataset)")
    if isinstance(kw["rehearsal_from"], str):
        _check_dataset(kw["rehearsal_from"], "rehearsal_from")
    if isinstance(kw.get("dataset"), str):
        _check_dataset(kw["dataset"], "dataset")
    if not (number(kw["warmup_ratio"]) and 0.0 <= kw["warmup_ratio"] <= 1.0):
        bad("warmup_ratio", "0 <= ratio <= 1")
    if not (number(kw["weight_decay"]) and kw["weight_decay"] >= 0):
        bad("weight_decay", "a finite number >= 0")
    if kw["max_grad_norm"] is not None and not (number(kw["max_grad_norm"]) and kw["max_grad_norm"] > 0):
        bad("max_grad_norm", "None (no clipping) or a finite number > 0")
    for name, allowed in (("lr_scheduler", SCHEDULERS), ("precision", PRECISIONS), ("dist", DISTS)):
        if kw[name] not in allowed:
            bad(name, " | ".join(allowed))
    _check_model(kw.get("model"))
    context = model_context(kw.get("model"))
    if context is not None and kw["max_length"] > context:
        raise SpecError(f"max_length={kw['max_length']} exceeds the model's context of {context} tokens")


def model_context(model) -> int | None:
    """The longest sequence a model takes, from the registry or its directory's config.json (no loading)."""
    if isinstance(model, dict):
        return model_context(model.get("model"))
    if model is None:
        return None
    folder = registry.model_dir(model)
    path = folder / "config.json" if folder is not None else None
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text()).get("max_position_embeddings")
        except ValueError:
            return None
    spec = registry.entries("models").get(str(model), {})
    return spec.get("context") or (spec.get("config") or {}).get("max_position_embeddings")


def train_sets() -> list[str]:
    return [n for n, s in registry.entries("datasets").items() if s["kind"] == "train"]


def _check_dataset(name: str, key: str) -> None:
    if name not in train_sets():
        raise SpecError(f"{key}={name!r}: unknown training set; allowed: {', '.join(train_sets())}")


def _check_model(model) -> None:
    if isinstance(model, dict):
        resolve(model)  # the stage it continues
    elif isinstance(model, (str, Path)):
        try:
            path = registry.model_dir(model)  # a preset's name is the preset, whatever folder shares it
        except registry.RegistryError as err:
            raise SpecError(f"model={str(model)!r}: neither a model directory nor a model preset; presets: "
                            f"{', '.join(registry.names('models'))}; a folder is written as a path "
                            f"(./{model})") from err
        if path is not None and not path.is_dir():
            raise SpecError(f"model={str(model)!r}: the model folder {path} does not exist; presets: "
                            f"{', '.join(registry.names('models'))}")


def canonical(spec: dict) -> dict:
    """What identifies the trained weights: the resolved spec less how it runs and less the options that do
    not apply (SAM's without SAM, rehearsal's without rehearsal); the starting model by its id."""
    kw = resolve(spec)
    out = {k: v for k, v in kw.items() if k not in RUNTIME_KEYS}
    if kw["optimizer"] != "sam":
        for k in SAM_KEYS:
            out.pop(k)
    if kw["rehearsal_fraction"] == 0:
        for k in REHEARSAL_KEYS:
            out.pop(k)
    for k, old in ADDED_LATER.items():
        if out[k] == old:
            out.pop(k)
    out["model"] = model_ref(kw["model"])
    out["dataset"] = _data_ref(kw["dataset"])
    if "rehearsal_from" in out:
        out["rehearsal_from"] = _data_ref(out["rehearsal_from"])
    return out


def run_id(spec: dict) -> str:
    """A short hash of a stage's canonical spec: the name of its cached model and of its results."""
    return config_hash(canonical(spec))


def merge_id(stage1_ref, stage2_ref, alpha: float) -> str:
    """The run id of a Wise-FT merge, from its two models' refs (``model_ref``) and alpha."""
    return config_hash({"method": "wise-ft", "alpha": float(alpha), "stage1": stage1_ref, "stage2": stage2_ref})


def model_ref(model) -> str | dict:
    """A model preset by name, a stage spec or a cfsam-made directory by its run id, any other directory by
    the sha256 of its weight files: never by path, so a moved or copied cache keeps its ids."""
    if isinstance(model, dict):
        return {"run": run_id(model)}
    path = registry.model_dir(model)
    if path is not None:
        for marker in ("snapshot.json", "metrics.json", "merge.json"):
            if (path / marker).exists():
                try:
                    found = json.loads((path / marker).read_text())
                    return {"run": found["run_id"], **({"at": found["at"], "of": found["of"]} if "of" in found else {})}
                except (ValueError, KeyError) as err:
                    raise SpecError(f"{path / marker} is damaged ({err}): delete {path} to retrain it") from err
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise SpecError(f"model directory {path} holds no weights (*.safetensors or *.bin)")
        digest = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return {"weights": digest.hexdigest()[:16]}
    return str(model)


def _data_ref(dataset) -> str | dict:
    if isinstance(dataset, str):
        return dataset  # its files' hashes go to the provenance, checked where the data is present
    cols = set(getattr(dataset, "column_names", []) or [])
    if not {"input_ids", "labels"} <= cols:
        raise SpecError(f"dataset must be a registry name or a datasets.Dataset with input_ids and labels "
                        f"columns; got {type(dataset).__name__} with columns {sorted(cols)}")
    return {"fingerprint": getattr(dataset, "_fingerprint", None), "rows": len(dataset)}
