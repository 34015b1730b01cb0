"""The registries, as data under ``src/cfsam/registry/``: models, datasets, tasks, presets and claims.

One loader and one error: ``entries(kind)`` reads a registry (a YAML file, or a folder of YAML files, one
entry each), ``entry(kind, name)`` one entry, and an unknown name or a damaged file raises
``RegistryError`` naming the value and what is allowed. Only yaml is imported here, so reading a
registry (and the results cache above it) needs neither torch nor the data.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from cfsam.core.errors import UsageError

ROOT = Path(__file__).resolve().parents[1] / "registry"
# kind -> (file or folder under ROOT, what one entry is called in messages)
KINDS = {"models": ("models.yaml", "model preset"), "datasets": ("datasets.yaml", "dataset"),
         "tasks": ("tasks", "task"), "presets": ("presets", "preset"), "claims": ("claims.yaml", "claim")}


class RegistryError(UsageError):
    """An unknown name, or a registry file that cannot be read; the message says what is allowed."""


def _read(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RegistryError(f"registry file {path} cannot be read: {err}") from err


@lru_cache(maxsize=None)
def entries(kind: str) -> dict[str, dict]:
    """Every entry of a registry by name, in file order (folders: one YAML per entry, sorted by file name)."""
    if kind not in KINDS:
        raise RegistryError(f"unknown registry {kind!r}; allowed: {', '.join(KINDS)}")
    path = ROOT / KINDS[kind][0]
    if path.is_dir():
        out = {}
        for f in sorted(path.glob("*.yaml")):
            spec = _read(f)
            if not isinstance(spec, dict):
                raise RegistryError(f"registry file {f} must hold a mapping, got {type(spec).__name__}")
            out[spec.get("task", spec.get("name", f.stem)) if kind == "tasks" else f.stem] = spec
        return out
    data = _read(path)
    if kind == "claims":  # a list of claims, each with its id
        return {c["id"]: c for c in data}
    return data


def names(kind: str) -> list[str]:
    return list(entries(kind))


def entry(kind: str, name: str) -> dict:
    reg = entries(kind)
    if name not in reg:
        raise RegistryError(f"unknown {KINDS[kind][1]} {name!r}; allowed: {', '.join(reg)}")
    return reg[name]


def model_dir(model) -> Path | None:
    """The folder a model argument names, or None when it names a model preset.

    A preset's name always means the preset: a folder of that name in the working directory (a Trainer's
    output ``tiny/``) never replaces it. A folder is taken only when written as a path: with a ``/``, or
    ``./name``, ``~/name``. A bare name that is neither is an error that says how to write the folder.
    """
    text = str(model)
    if text in names("models"):
        return None
    if "/" in text or text.startswith((".", "~")) or Path(text).is_absolute():
        return Path(text).expanduser()
    here = f"the folder here is used as ./{text}" if Path(text).is_dir() else f"e.g. ./{text}"
    raise RegistryError(f"unknown model preset {text!r}; allowed: {', '.join(names('models'))}, or a model "
                        f"folder written as a path ({here})")
