"""The book's chapters, as data: the list is ``_toc.yml``; each notebook declares the experiments it reads.

A chapter notebook's metadata holds ``cfsam: {experiments: [pattern, ...], exclude: [pattern, ...]}``:
shell-style patterns over the preset's experiment names (``s2-*-sam``, ``*/*`` for other model sizes).
Nothing in the library names a chapter; adding one means adding the notebook and its line in ``_toc.yml``.
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import yaml

from cfsam.core.errors import UsageError

REPO = Path(__file__).resolve().parents[3]
NOTEBOOKS_DIR = REPO / "notebooks"


class ChapterError(UsageError):
    """An unknown chapter, or a notebook whose metadata cannot be read."""


def _toc_files(toc: dict) -> list[str]:
    out = []
    for part in toc.get("parts", []) or []:
        for ch in part.get("chapters", []) or []:
            out.append(ch["file"])
            out += _toc_files({"parts": [{"chapters": ch.get("sections", [])}]})
    return out


def chapters(notebooks_dir: Path | None = None, toc_file: Path | None = None, *, present: bool = True) -> list[str]:
    """Notebook chapters in book order: the ``notebooks/`` files of ``_toc.yml`` present in ``notebooks_dir``."""
    nb_dir = Path(notebooks_dir or NOTEBOOKS_DIR)
    toc_path = Path(toc_file or REPO / "_toc.yml")
    files = _toc_files(yaml.safe_load(toc_path.read_text())) if toc_path.exists() else []
    listed = [Path(f).name.removesuffix(".ipynb") for f in files if f.startswith("notebooks/")]
    return [n for n in listed if not present or (nb_dir / f"{n}.ipynb").exists()]


def declared(notebook: str, notebooks_dir: Path | None = None) -> dict:
    """The ``cfsam`` metadata of a chapter: its experiment patterns (all experiments when it declares none)."""
    path = Path(notebooks_dir or NOTEBOOKS_DIR) / f"{notebook}.ipynb"
    try:
        meta = json.loads(path.read_text()).get("metadata", {}).get("cfsam", {})
    except (OSError, ValueError) as err:
        raise ChapterError(f"chapter {notebook!r}: cannot read {path} ({err})") from err
    return {"experiments": list(meta.get("experiments", ["*"])), "exclude": list(meta.get("exclude", []))}


def select(patterns: dict, names: list[str]) -> list[str]:
    """The names matching any pattern of ``experiments`` and none of ``exclude``, in the given order."""
    def hit(name, pats):
        return any(fnmatch.fnmatchcase(name, p) for p in pats)

    return [n for n in names if hit(n, patterns["experiments"]) and not hit(n, patterns["exclude"])]


def chapter_experiments(notebook: str, names: list[str], notebooks_dir: Path | None = None) -> list[str]:
    return select(declared(notebook, notebooks_dir), names)
