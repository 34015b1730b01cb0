"""Presets: what to run and at which scale (``smoke`` | ``cpu`` | ``paper``), as YAML under registry/presets.

A preset is validated when loaded: every key must be known, with the right type, and every model,
dataset and eval task must exist in its registry; a bad one is named along with what is allowed.
``load_preset`` also accepts a path to a YAML file of the same shape, and dotted overrides
(``{"stage2.lr": 1e-4}``) for sweeps.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import yaml

REGISTRY = Path(__file__).parent / "registry"
PRESET_DIR = REGISTRY / "presets"

NUM = (int, float)
OPT_INT = (int, type(None))
# key -> type (or nested schema). Kept next to the loader so one glance tells what a preset holds.
SCHEMA = {
    "description": str,
    "model": str,
    "sizes": list,
    "seed": int,
    "max_length": int,
    "data": {"stage1": str, "stage2": list, "n_stage1": OPT_INT, "n_stage2": OPT_INT, "n_heldout": int},
    "stage1": {"optimizer": str, "lr": NUM, "epochs": NUM, "batch_size": int, "grad_accum": int},
    "stage2": {"lr": NUM, "batch_size": int, "grad_accum": int, "epochs_adamw": NUM, "epochs_sam": NUM,
               "rho": NUM, "adaptive": bool},
    "wise_ft": {"alpha": NUM},
    "rehearsal": {"fraction": NUM},
    "rho_sweep": list,
    "eval": {"tasks": list, "limit": OPT_INT},
    "landscape": {"dataset": str, "grid": int, "span": NUM, "n_examples": int, "batch_size": int,
                  "seeds": list, "filter_norm": bool, "hessian_iters": int, "hutchinson_probes": int},
}


class PresetError(ValueError):
    """An unknown preset, key, model, dataset or task, or an impossible value."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def _registry_names(kind: str) -> tuple[str, ...]:
    if kind == "tasks":
        tasks_dir = REGISTRY / "tasks"
        names = []
        for f in sorted(tasks_dir.glob("*.yaml")):
            spec = yaml.safe_load(f.read_text()) or {}
            names.append(spec.get("name", f.stem) if isinstance(spec, dict) else f.stem)
        return tuple(names)
    return tuple(yaml.safe_load((REGISTRY / f"{kind}.yaml").read_text()))


def load_preset(name_or_path: str | Path, overrides: dict | None = None) -> dict:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        name = path.stem
    else:
        name = str(name_or_path)
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            raise PresetError(f"unknown preset {name!r}; allowed: {', '.join(preset_names())} (or a YAML path)")
    try:
        preset = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PresetError(f"preset file {path} is not valid YAML: {err}") from err
    if not isinstance(preset, dict):
        raise PresetError(f"preset file {path} must hold a mapping of keys, got {type(preset).__name__}")
    preset = copy.deepcopy(preset)
    for dotted, value in (overrides or {}).items():
        _set(preset, dotted, value)
    _check(preset, SCHEMA, "")
    _check_values(preset)
    preset["name"] = name
    return preset


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not isinstance(tree.get(p), dict):
            raise PresetError(f"override {dotted!r}: {p!r} is not a section; sections: "
                              f"{', '.join(k for k, v in SCHEMA.items() if isinstance(v, dict))}")
        tree = tree[p]
    tree[leaf] = value


def _check(tree: dict, schema: dict, where: str) -> None:
    unknown = set(tree) - set(schema)
    if unknown:
        raise PresetError(f"unknown preset key(s) {', '.join(where + k for k in sorted(unknown))}; "
                          f"allowed{' in ' + where.rstrip('.') if where else ''}: {', '.join(schema)}")
    missing = set(schema) - set(tree)
    if missing:
        raise PresetError(f"preset is missing key(s) {', '.join(where + k for k in sorted(missing))}")
    for key, kind in schema.items():
        value = tree[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise PresetError(f"preset key {where}{key} must be a mapping with keys {', '.join(kind)}")
            _check(value, kind, f"{where}{key}.")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise PresetError(f"preset key {where}{key}={value!r} must be {expected}")


def _check_values(p: dict) -> None:
    def allowed(kind: str, values: list, key: str):
        names = _registry_names(kind)
        if not names:
            return
        bad = [v for v in values if v not in names]
        if bad:
            raise PresetError(f"preset key {key}: unknown {kind[:-1]} {', '.join(map(repr, bad))}; "
                              f"allowed: {', '.join(names)}")

    allowed("models", [p["model"], *p["sizes"]], "model/sizes")
    allowed("datasets", [p["data"]["stage1"], *p["data"]["stage2"], p["landscape"]["dataset"]], "data")
    allowed("tasks", p["eval"]["tasks"], "eval.tasks")
    if p["stage1"]["optimizer"] not in ("adamw", "sam"):
        raise PresetError(f"stage1.optimizer={p['stage1']['optimizer']!r}; allowed: adamw, sam")
    positive = {"stage1.lr": p["stage1"]["lr"], "stage2.lr": p["stage2"]["lr"], "stage2.rho": p["stage2"]["rho"],
                "stage1.epochs": p["stage1"]["epochs"], "stage2.epochs_adamw": p["stage2"]["epochs_adamw"],
                "stage2.epochs_sam": p["stage2"]["epochs_sam"], "max_length": p["max_length"],
                "landscape.span": p["landscape"]["span"]}
    positive.update({f"rho_sweep[{i}]": r for i, r in enumerate(p["rho_sweep"])})
    for key, value in positive.items():
        if not isinstance(value, (int, float)) or value <= 0:
            raise PresetError(f"preset key {key}={value!r} must be a positive number")
    for key in ("stage1.batch_size", "stage1.grad_accum", "stage2.batch_size", "stage2.grad_accum"):
        section, leaf = key.split(".")
        if p[section][leaf] < 1:
            raise PresetError(f"preset key {key}={p[section][leaf]} must be >= 1")
    if not 0.0 <= p["wise_ft"]["alpha"] <= 1.0:
        raise PresetError(f"wise_ft.alpha={p['wise_ft']['alpha']} must lie in [0, 1]")
    if not 0.0 <= p["rehearsal"]["fraction"] < 1.0:
        raise PresetError(f"rehearsal.fraction={p['rehearsal']['fraction']} must lie in [0, 1)")
    if p["landscape"]["grid"] < 3:
        raise PresetError(f"landscape.grid={p['landscape']['grid']} must be >= 3 (SC needs interior points)")
