"""Atomic file writes (a killed run never leaves a half-written result, checkpoint record or script),
and the one hash of a JSON-able config that names stages, merges and experiments."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write to a temporary sibling, then rename over the target (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    """JSON (indented, non-JSON values as strings or floats) written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False, default=_default) + "\n")


def _default(value):
    try:
        return float(value)  # numpy scalars
    except (TypeError, ValueError):
        return str(value)


def config_hash(obj, length: int = 16) -> str:
    """A short sha256 of a JSON-able config, independent of key order: same config, same id."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
