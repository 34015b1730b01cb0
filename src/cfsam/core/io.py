"""Atomic file writes (a killed run never leaves a half-written result, checkpoint record or script),
and the one hash of a JSON-able config that names stages, merges and experiments."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write to a temporary sibling, then rename over the target (atomic on POSIX); a ``.gz`` path is
    written gzip-compressed (with no timestamp: the same text, the same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = text.encode("utf-8")
    tmp.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    """JSON (indented, non-JSON values as strings or floats) written atomically; gzip-compressed to a ``.gz``
    path."""
    return write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False, default=_default) + "\n")


def read_json(path: str | Path):
    """What ``write_json_atomic`` wrote (a ``.gz`` path decompressed); ValueError for a damaged file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        return json.loads((gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8"))
    except (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from err


def _default(value):
    try:
        return float(value)  # numpy scalars
    except (TypeError, ValueError):
        return str(value)


def config_hash(obj, length: int = 16) -> str:
    """A short sha256 of a JSON-able config, independent of key order: same config, same id."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
