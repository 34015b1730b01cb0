"""The training and eval data sets: the registry (data, not code), the mirror or the Hub, file hashes."""
from __future__ import annotations

import bz2
import glob
import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path

import datasets

from cfsam.data import hub
from cfsam.data.catalog import DamagedFile, DataError, DataUnavailable, dataset_names, dataset_spec, registry

log = logging.getLogger(__name__)


datasets.disable_progress_bars()


# map() caches are keyed by a hash that misses changes in the helpers a lambda calls: recompute instead
datasets.disable_caching()


HELDOUT_FRACTION, HELDOUT_MAX = 0.05, 500  # fixed held-out slice of every training set (seed 0)


def data_dir() -> Path | None:
    d = os.environ.get("CFSAM_DATA_DIR")
    return Path(d).expanduser() if d else None


FIXTURE_MARK = "FIXTURES.md"  # in a data folder: test fixtures (tests/fixtures/data), not the data sets


def is_fixture_data() -> bool:
    """Whether CFSAM_DATA_DIR holds the test fixtures (scripts/make_fixtures.py): the loaders read them as a
    mirror, but results computed on the real data are never checked against them."""
    root = data_dir()
    return root is not None and (root / FIXTURE_MARK).is_file()


def use_mirror() -> bool:
    """Mirror when CFSAM_DATA_DIR is set (CFSAM_DATA_SOURCE=hub|mirror overrides)."""
    source = os.environ.get("CFSAM_DATA_SOURCE", "auto")
    if source not in ("auto", "hub", "mirror"):
        raise DataError(f"CFSAM_DATA_SOURCE={source!r}; allowed: auto, hub, mirror")
    if source == "mirror" and data_dir() is None:
        raise DataError("CFSAM_DATA_SOURCE=mirror but CFSAM_DATA_DIR is not set")
    return source == "mirror" or (source == "auto" and data_dir() is not None)


def label(name: str) -> str | None:
    """What stands in for the paper's set here (substitute or variant), or None if it is the set itself."""
    spec = dataset_spec(name)
    if not use_mirror():
        return spec.get("hub", {}).get("variant")
    if "substitute" in spec:
        return spec["substitute"]["label"]
    return spec.get("variant")


def shared_sources(names: list[str]) -> list[tuple[str, str, list[str]]]:
    """Pairs of these training sets whose stand-ins here draw on a common source set, with what they share:
    their results are related, not independent replications (MetaMathQA's and Open-Platypus's both hold MATH)."""
    if not use_mirror():
        return []

    def parts(name: str) -> set[str]:
        spec = dataset_spec(name)
        return set(spec["substitute"]["sets"]) if "substitute" in spec else {name}

    return [(a, b, sorted(parts(a) & parts(b))) for i, a in enumerate(names) for b in names[i + 1:]
            if parts(a) & parts(b)]


def splits(name: str) -> list[str]:
    return list(dataset_spec(name).get("files", {}))


def raw_files(name: str, split: str | None = None) -> list[Path]:
    """The mirror files of a set (one split, or all), in a stable order."""
    spec, root = dataset_spec(name), data_dir()
    if root is None:
        raise DataError(f"dataset {name!r}: CFSAM_DATA_DIR is not set, so there is no mirror to read")
    if "files" not in spec:
        raise DataUnavailable(f"dataset {name!r} is not in the mirror: "
                              + (spec.get("missing") or f"use its substitute ({spec['substitute']['label']})"))
    if not root.is_dir():
        raise DataError(f"CFSAM_DATA_DIR={root} {'is not a directory' if root.exists() else 'does not exist'}; "
                        "point it at the data mirror (the folder holding MANIFEST.md)")
    chosen = [split] if split else list(spec["files"])
    out: list[Path] = []
    for s in chosen:
        if s not in spec["files"]:
            raise DataError(f"dataset {name!r} has no split {s!r}; allowed: {', '.join(spec['files'])}")
        for pattern in spec["files"][s]:
            hits = sorted(glob.glob(str(root / pattern)))
            if not hits:
                # the registry lists it, so the mirror should have it: an incomplete mirror, not a missing set
                raise DataError(f"dataset {name!r}: no file matches {root / pattern}, which the data registry "
                                f"expects in the mirror; restore it (MANIFEST.md names its source) or point "
                                f"CFSAM_DATA_DIR at a complete mirror")
            out += [check_file(Path(h), name) for h in hits]
    return out


def check_file(path: Path, name: str) -> Path:
    """A mirror file that is a readable plain file of the size MANIFEST.md lists (when it lists it), or
    DamagedFile naming it. The size catches truncation that leaves whole lines, which parse fine."""
    fix = "restore it from a good copy of the mirror (MANIFEST.md names its source)"
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is missing" if not path.exists() else "is not a plain file"
        raise DamagedFile(f"dataset {name!r}: {path} {what}, not a data file; {fix}")
    if not os.access(path, os.R_OK):
        raise DamagedFile(f"dataset {name!r}: {path} cannot be read (permission denied); make it readable or {fix}")
    root, want = data_dir(), None
    if root is not None and path.is_relative_to(root):
        try:
            listed = _manifest_sizes(str(root), (root / "MANIFEST.md").stat().st_mtime_ns)
        except OSError:  # no MANIFEST.md (a test mirror): nothing to compare with
            listed = {}
        want = listed.get(path.relative_to(root).as_posix())
    size = path.stat().st_size
    if want is not None and size != want:
        raise DamagedFile(f"dataset {name!r}: {path} is {size} bytes but MANIFEST.md lists {want} (truncated or "
                          f"changed); {fix}")
    return path


@lru_cache(maxsize=8)
def _manifest_sizes(root: str, _mtime: int) -> dict[str, int]:
    """local file -> bytes, from the table in the mirror's MANIFEST.md."""
    try:
        text = (Path(root) / "MANIFEST.md").read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    out = {}
    for row in text.splitlines():
        # | dataset | `local file` | source | path | split | records | bytes | sha256 | licence |
        cells = [c.strip() for c in row.split("|")]
        if len(cells) > 8 and cells[2].startswith("`") and cells[2].endswith("`") and cells[7].isdigit():
            out[cells[2].strip("`")] = int(cells[7])
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=256)
def _sha256_cached(path: str, mtime: float, size: int) -> str:
    return sha256(Path(path))


def file_hashes(name: str, splits: list[str] | None = None) -> dict[str, str]:
    """sha256 of every mirror file a set reads (substitutes: of their sources), all splits.

    From the Hub: ``hub:<id>[/<config>][:<split>]`` (one per split given) -> the pinned revision, or
    "unpinned" when the registry pins none (the Hub's latest was read)."""
    spec = dataset_spec(name)
    if not use_mirror():
        on_hub = spec.get("hub", {})
        if "id" not in on_hub:
            return {"missing": on_hub.get("missing", "no Hub copy registered")}
        return {"hub:" + hub.hub_ref(name, s): on_hub.get("revision", "unpinned") for s in (splits or [None])}
    if "substitute" in spec:
        return {k: v for s in spec["substitute"]["sets"] for k, v in file_hashes(s).items()}
    if "missing" in spec:
        return {"missing": spec["missing"]}
    root = data_dir()
    out = {}
    for p in raw_files(name):
        st = p.stat()
        out[str(p.relative_to(root))] = _sha256_cached(str(p), st.st_mtime, st.st_size)
    for lab in spec.get("labels", {}).values():
        out[lab] = sha256(check_file(root / lab, name))
    return out


def load_raw(name: str, split: str) -> datasets.Dataset:
    """One split of a mirror set, as read by datasets' loaders (plus its sidecar labels, if any)."""
    spec = dataset_spec(name)
    files = [str(p) for p in raw_files(name, split)]
    fmt = spec["format"]
    if fmt not in ("json", "csv_noheader", "tsv_noheader", "hellaswag6"):
        raise DataError(f"dataset {name!r}: unknown format {fmt!r}")
    try:
        ds = _read(fmt, files, spec)
    except DataError:
        raise
    except _READ_ERRORS as err:
        # name the one bad file: a split may span many (MMLU: 57 subjects)
        bad = next((f for f in files if len(files) > 1 and _unreadable(fmt, f, spec)), None)
        where = bad or (files[0] if len(files) == 1 else f"one of {files}")
        raise DamagedFile(f"dataset {name!r}: malformed file {where} ({_reason(err)}); restore it from a good "
                          "copy of the mirror (MANIFEST.md names its source)") from err
    if split in spec.get("labels", {}):
        path = check_file(data_dir() / spec["labels"][split], name)
        try:
            labels = [int(x) for x in path.read_text().split()]
        except (OSError, ValueError) as err:
            raise DamagedFile(f"dataset {name!r}: malformed label file {path} ({_reason(err)})") from err
        if len(labels) != len(ds):
            raise DamagedFile(f"dataset {name!r}: {path} holds {len(labels)} labels for {len(ds)} records in "
                              f"{', '.join(files)}; one of them is damaged")
        ds = ds.add_column("label", labels)
    return ds


# what a damaged file raises in datasets' loaders (pyarrow's ArrowInvalid and pandas' ParserError are
# ValueErrors), in bz2 (EOFError: truncated; OSError: not bz2) and in text decoding
_READ_ERRORS = (datasets.exceptions.DatasetGenerationError, ValueError, OSError, EOFError)


def _read(fmt: str, files: list[str], spec: dict) -> datasets.Dataset:
    if fmt == "json":
        return datasets.load_dataset("json", data_files=files, split="train")
    if fmt in ("csv_noheader", "tsv_noheader"):
        return _load_table(files, spec["columns"], "\t" if fmt == "tsv_noheader" else ",")
    return _load_hellaswag6(files)


def _unreadable(fmt: str, file: str, spec: dict) -> bool:
    try:
        _read(fmt, [file], spec)
        return False
    except _READ_ERRORS:  # DataError (hellaswag6's line count) is a ValueError too
        return True


def _reason(err: BaseException) -> str:
    """The innermost cause's type and first line: datasets wraps the parser's message in a generic one."""
    while err.__cause__ is not None:
        err = err.__cause__
    msg = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def _load_table(files: list[str], columns: list[str], sep: str) -> datasets.Dataset:
    import csv

    # quoting matters: MMLU questions hold commas and quotes; wiki-auto sentences hold stray quotes
    quoting = csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE
    parts = []
    for f in files:
        ds = datasets.load_dataset("csv", data_files=f, split="train", sep=sep, header=None, names=columns,
                                   quoting=quoting, keep_default_na=False,
                                   features=datasets.Features({c: datasets.Value("string") for c in columns}))
        parts.append(ds.add_column("source_file", [Path(f).name] * len(ds)))
    return datasets.concatenate_datasets(parts)


def _load_hellaswag6(files: list[str]) -> datasets.Dataset:
    # llama.cpp's format: context line, gold label line, 4 ending lines
    rows = []
    for f in files:
        lines = bz2.open(f, "rt").read().splitlines() if f.endswith(".bz2") else Path(f).read_text().splitlines()
        if len(lines) % 6:
            raise DamagedFile(f"{f}: {len(lines)} lines is not a multiple of 6 (hellaswag6 format); restore it "
                              "from a good copy of the mirror (MANIFEST.md names its source)")
        for i in range(0, len(lines), 6):
            rows.append({"ctx": lines[i], "label": int(lines[i + 1]), "endings": lines[i + 2:i + 6]})
    return datasets.Dataset.from_list(rows)


def load_eval(name: str, split: str) -> list[dict]:
    """One split of an evaluation set as records in the mirror's schema: from the mirror, else the Hub."""
    spec = dataset_spec(name)
    if spec["kind"] != "eval":
        raise DataError(f"dataset {name!r} is a training set; evaluation sets: {', '.join(dataset_names('eval'))}")
    if not use_mirror():
        return hub.hub_records(name, split)
    if "files" not in spec:
        reason = spec.get("missing") or f"dataset {name!r} is not in the mirror"
        if "id" in spec.get("hub", {}):
            reason += f"; CFSAM_DATA_SOURCE=hub reads it from the Hugging Face Hub ({hub.hub_ref(name)})"
        raise DataUnavailable(reason)
    return load_raw(name, split).to_list()  # a damaged or absent file raises DataError: not a missing set


def availability(name: str) -> str:
    spec = dataset_spec(name)
    if use_mirror():
        if "substitute" in spec:
            return "substitute: " + spec["substitute"]["label"]
        if "missing" in spec:
            return "missing: " + spec["missing"]
        try:
            files = raw_files(name)
            return f"mirror ({len(files)} file{'s' if len(files) > 1 else ''})" + (
                f" [{spec['variant']}]" if spec.get("variant") else "")
        except DamagedFile as err:
            return f"damaged: {err}"
        except DataError as err:
            return f"unavailable: {err}"
    try:
        return f"hub ({hub.hub_ref(name)})"
    except DataError as err:
        return f"unavailable: {err}"
