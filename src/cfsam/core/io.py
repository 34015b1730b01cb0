"""Atomic file writes (a killed run never leaves a half-written result, checkpoint record or script),
and the one hash of a JSON-able config that names stages, merges and experiments."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

from cfsam.core.errors import CfsamError, UsageError


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write to a temporary sibling, then rename over the target (atomic on POSIX); a ``.gz`` path is
    written gzip-compressed (with no timestamp: the same text, the same bytes). A write that fails (a full
    disk, a read-only folder) leaves no temporary file and raises ``DiskError`` naming the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = text.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, err) from err
    return path


class DiskError(CfsamError, OSError):
    """A file that could not be written: the message names it, the reason and the free space there."""


def disk_error(path: str | Path, err: BaseException) -> DiskError:
    """``err``, met writing ``path``, as one line naming the path, the reason and the free space there."""
    reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    out = DiskError(f"cannot write {path}: {reason} ({free_space(Path(path).parent)}); free some space or point "
                    "CFSAM_RESULTS / CFSAM_CACHE at another disk")
    out.errno = getattr(err, "errno", None)
    return out


def free_space(path: str | Path) -> str:
    """``'N GB free on P'`` for the file system holding ``path`` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 1e9:.2f} GB free on {path}"
    except OSError:
        return "free space unknown"


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
        raise UsageError(f"{type(err).__name__}: {err}") from err


def _default(value):
    try:
        return float(value)  # numpy scalars
    except (TypeError, ValueError):
        return str(value)


def config_hash(obj, length: int = 16) -> str:
    """A short sha256 of a JSON-able config, independent of key order: same config, same id."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
