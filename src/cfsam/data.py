"""Dataset registry, prompt formatting and response-only labels.

Every set of the paper resolves by name (``registry/datasets.yaml``) either to the local mirror in
``$CFSAM_DATA_DIR`` (laid out like ``shared/data``) or to its Hugging Face Hub id. Sets the mirror
lacks resolve to a documented substitute, and ``label(name)`` says so; every result made with one
carries that label. Files are read with ``datasets``' own json/csv/text loaders.

Evaluation sets come as records in the mirror's schema from either source (``load_eval``): a Hub copy
is rewritten by its registry entry's ``hub.fields`` (Jinja expressions over one Hub record), so the
task templates of ``cfsam.tasks`` see the same records wherever the data came from.

Training records are normalised to ``{"id", "turns": [{"prompt", "response"}, ...]}`` and rendered
with the Alpaca template (Taori et al. 2023); later ShareGPT turns continue in the same template.
The loss sees response tokens only: prompt tokens get label -100, as in the paper.
"""
from __future__ import annotations

import bz2
import glob
import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import datasets
import jinja2
import torch
import yaml

log = logging.getLogger(__name__)
datasets.disable_progress_bars()
# map() caches are keyed by a hash that misses changes in the helpers a lambda calls: recompute instead
datasets.disable_caching()

REGISTRY_FILE = Path(__file__).parent / "registry" / "datasets.yaml"
IGNORE = -100

PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
NEXT_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
HELDOUT_FRACTION, HELDOUT_MAX = 0.05, 500  # fixed held-out slice of every training set (seed 0)


class DataError(ValueError):
    """Unknown dataset, missing file, or a malformed record."""


# --------------------------------------------------------------------------------------- registry
@lru_cache(maxsize=1)
def registry() -> dict[str, dict]:
    with open(REGISTRY_FILE) as f:
        return yaml.safe_load(f)


def dataset_names(kind: str | None = None) -> list[str]:
    return [n for n, s in registry().items() if kind is None or s["kind"] == kind]


def dataset_spec(name: str) -> dict:
    reg = registry()
    if name not in reg:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(reg)}")
    return reg[name]


def data_dir() -> Path | None:
    d = os.environ.get("CFSAM_DATA_DIR")
    return Path(d).expanduser() if d else None


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


def splits(name: str) -> list[str]:
    return list(dataset_spec(name).get("files", {}))


def raw_files(name: str, split: str | None = None) -> list[Path]:
    """The mirror files of a set (one split, or all), in a stable order."""
    spec, root = dataset_spec(name), data_dir()
    if root is None:
        raise DataError(f"dataset {name!r}: CFSAM_DATA_DIR is not set, so there is no mirror to read")
    if "files" not in spec:
        raise DataError(f"dataset {name!r} is not in the mirror: "
                        + (spec.get("missing") or f"use its substitute ({spec['substitute']['label']})"))
    chosen = [split] if split else list(spec["files"])
    out: list[Path] = []
    for s in chosen:
        if s not in spec["files"]:
            raise DataError(f"dataset {name!r} has no split {s!r}; allowed: {', '.join(spec['files'])}")
        for pattern in spec["files"][s]:
            hits = sorted(glob.glob(str(root / pattern)))
            if not hits:
                raise DataError(f"dataset {name!r}: no file matches {root / pattern}")
            out += [Path(h) for h in hits]
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
        hub = spec.get("hub", {})
        if "id" not in hub:
            return {"missing": hub.get("missing", "no Hub copy registered")}
        return {"hub:" + hub_ref(name, s): hub.get("revision", "unpinned") for s in (splits or [None])}
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
        out[lab] = sha256(root / lab)
    return out


# ----------------------------------------------------------------------------------- raw loading
def load_raw(name: str, split: str) -> datasets.Dataset:
    """One split of a mirror set, as read by datasets' loaders (plus its sidecar labels, if any)."""
    spec = dataset_spec(name)
    files = [str(p) for p in raw_files(name, split)]
    fmt = spec["format"]
    try:
        if fmt == "json":
            ds = datasets.load_dataset("json", data_files=files, split="train")
        elif fmt in ("csv_noheader", "tsv_noheader"):
            ds = _load_table(files, spec["columns"], "\t" if fmt == "tsv_noheader" else ",")
        elif fmt == "hellaswag6":
            ds = _load_hellaswag6(files)
        else:
            raise DataError(f"dataset {name!r}: unknown format {fmt!r}")
    except (datasets.exceptions.DatasetGenerationError, json.JSONDecodeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"dataset {name!r}: malformed file among {files}: {err}") from err
    if split in spec.get("labels", {}):
        lines = (data_dir() / spec["labels"][split]).read_text().split()
        if len(lines) != len(ds):
            raise DataError(f"dataset {name!r}: {len(lines)} labels for {len(ds)} records")
        ds = ds.add_column("label", [int(x) for x in lines])
    return ds


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


def llamacpp_clean(text: str) -> str:
    """llama.cpp's HellaSwag export cleaning (klosax/hellaswag_text_data, extract_hellaswag.cpp).

    Its replacements, in its order, each one left-to-right pass as str.replace; then one leading and one
    trailing space go (the C++ trailing erase is erase(end()), undefined: its evident intent is kept)."""
    for old, new in (("[header]", ""), ("[step]", ""), ("[substeps]", ""), (" [title]", ". "), ("[title] ", ""),
                     ("[title].", ""), ("  ", " ")):
        text = text.replace(old, new)
    text = text[1:] if text.startswith(" ") else text
    return text[:-1] if text.endswith(" ") else text


def _load_hellaswag6(files: list[str]) -> datasets.Dataset:
    # llama.cpp's format: context line, gold label line, 4 ending lines
    rows = []
    for f in files:
        lines = bz2.open(f, "rt").read().splitlines() if f.endswith(".bz2") else Path(f).read_text().splitlines()
        if len(lines) % 6:
            raise DataError(f"{f}: {len(lines)} lines is not a multiple of 6 (hellaswag6 format)")
        for i in range(0, len(lines), 6):
            rows.append({"ctx": lines[i], "label": int(lines[i + 1]), "endings": lines[i + 2:i + 6]})
    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------- evaluation records
def load_eval(name: str, split: str) -> list[dict]:
    """One split of an evaluation set as records in the mirror's schema: from the mirror, else the Hub."""
    spec = dataset_spec(name)
    if spec["kind"] != "eval":
        raise DataError(f"dataset {name!r} is a training set; evaluation sets: {', '.join(dataset_names('eval'))}")
    if not use_mirror():
        return _hub_records(name, split)
    if "files" not in spec:
        reason = spec.get("missing") or f"dataset {name!r} is not in the mirror"
        if "id" in spec.get("hub", {}):
            reason += f"; CFSAM_DATA_SOURCE=hub reads it from the Hugging Face Hub ({hub_ref(name)})"
        raise DataError(reason)
    return load_raw(name, split).to_list()


def hub_spec(name: str) -> dict:
    hub = dataset_spec(name).get("hub", {})
    if "id" not in hub:
        raise DataError(f"dataset {name!r} has no Hugging Face Hub copy ({hub.get('missing', 'none registered')}); "
                        "set CFSAM_DATA_DIR to a data mirror that holds it")
    return hub


def hub_ref(name: str, split: str | None = None) -> str:
    """``<id>[/<config>][:<split>]``: where a set (one split of it) comes from on the Hub."""
    hub = hub_spec(name)
    return hub["id"] + (f"/{hub['config']}" if hub.get("config") else "") + (f":{split}" if split else "")


def _load_hub(hub: dict, split: str) -> datasets.Dataset:
    kwargs = {"revision": hub["revision"]} if "revision" in hub else {}
    if "file" in hub:
        kwargs["data_files"] = hub["file"]
    return datasets.load_dataset(hub["id"], hub.get("config"), split=split, **kwargs)


def _hub_records(name: str, split: str) -> list[dict]:
    hub = hub_spec(name)
    try:
        raw = _load_hub(hub, split)
    except Exception as err:  # offline, unknown id or split, a loading script datasets no longer runs, ...
        msg = (str(err).strip().splitlines() or [""])[0][:300]
        raise DataError(f"dataset {name!r}: cannot read {hub_ref(name, split)} from the Hugging Face Hub "
                        f"({type(err).__name__}: {msg}); set CFSAM_DATA_DIR to a local data mirror (laid out as "
                        "its MANIFEST.md says) or allow Hub access (network; HF_HUB_OFFLINE and HF_DATASETS_OFFLINE "
                        "unset)") from err
    return _hub_to_mirror(name, raw.to_list(), split)


def _rows(columns: dict) -> list[dict]:
    # {"text": [...], "label": [...]} -> [{"text", "label"}, ...] (ARC's choices)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


@lru_cache(maxsize=1)
def _record_env() -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters.update(rows=_rows, zip_dict=lambda keys, values: dict(zip(keys, values)),
                       llamacpp_clean=llamacpp_clean)
    return env


def _hub_to_mirror(name: str, rows: list[dict], split: str) -> list[dict]:
    """Hub records -> the mirror's schema by the set's ``hub.fields`` (none: the Hub's fields are the mirror's)."""
    fields = hub_spec(name).get("fields")
    if not fields:
        return rows
    exprs = {k: (src, _record_env().compile_expression(src, undefined_to_none=False)) for k, src in fields.items()}
    out = []
    for i, row in enumerate(rows):
        rec = {}
        for key, (src, expr) in exprs.items():
            try:
                rec[key] = expr(**row, _split=split)
                if isinstance(rec[key], jinja2.Undefined):
                    str(rec[key])  # StrictUndefined raises here, naming the missing field
            except Exception as err:
                raise DataError(f"dataset {name!r}: Hub record {i} of {hub_ref(name, split)} does not fit "
                                f"{key}: {src!r} ({type(err).__name__}: {err}); its fields: {', '.join(row)}") from err
        out.append(rec)
    return out


# ------------------------------------------------------------------------------ training records
def _to_turns(spec: dict, record: dict) -> list[dict]:
    fields = spec["fields"]
    if "conversations" in fields:
        turns, prompt = [], None
        for msg in record[fields["conversations"]] or []:
            who = msg.get("from")
            if who in ("human", "user"):
                # the first turn opens the Alpaca template; segments() continues it for later turns
                prompt = msg["value"] if turns else PROMPT_NO_INPUT.format(instruction=msg["value"])
            elif who in ("gpt", "chatgpt", "assistant") and prompt is not None:
                turns.append({"prompt": prompt, "response": msg["value"]})
                prompt = None
        return turns

    def get(key):
        src = fields.get(key)
        if src is None:
            return ""
        return src[1:] if src.startswith("@") else (record.get(src) or "")  # "@text" is a literal

    return [{"prompt": PROMPT_INPUT.format(instruction=get("instruction"), input=get("input"))
             if get("input").strip() else PROMPT_NO_INPUT.format(instruction=get("instruction")),
             "response": get("output")}]


def load_records(name: str, split: str = "train") -> datasets.Dataset:
    """A training set as ``{"id", "turns"}`` records; split is train, heldout (fixed 5%, at most 500) or all."""
    if split not in ("train", "heldout", "all"):
        raise DataError(f"split {split!r}; allowed: train, heldout, all")
    return _load_records(name, split, str(data_dir()), use_mirror())


@lru_cache(maxsize=32)  # keyed by the mirror too: tests and users may point CFSAM_DATA_DIR elsewhere
def _load_records(name: str, split: str, _data_dir: str, _mirror: bool) -> datasets.Dataset:
    spec = dataset_spec(name)
    if spec["kind"] != "train":
        raise DataError(f"dataset {name!r} is an evaluation set; training sets: {', '.join(dataset_names('train'))}")
    if use_mirror() and "substitute" in spec:
        parts = [load_records(s, "all") for s in spec["substitute"]["sets"]]
        ds = datasets.concatenate_datasets(parts)
    elif use_mirror():
        ds = _records_from(spec, load_raw(name, "train"), name)
    else:
        ds = _records_from(spec, _load_hub(hub_spec(name), "train"), name)
    if split == "all":
        return ds
    n_held = min(HELDOUT_MAX, max(1, int(HELDOUT_FRACTION * len(ds))))
    parts = ds.train_test_split(test_size=n_held, seed=0, shuffle=True)
    return parts["test" if split == "heldout" else "train"]


def _records_from(spec: dict, raw: datasets.Dataset, name: str) -> datasets.Dataset:
    if spec.get("dedupe"):
        seen, keep = set(), []
        for i, v in enumerate(raw[spec["dedupe"]]):
            if v not in seen:
                seen.add(v)
                keep.append(i)
        raw = raw.select(keep)
    ds = raw.map(lambda r, i: {"id": f"{name}-{i}", "turns": _to_turns(spec, r)}, with_indices=True,
                 remove_columns=raw.column_names)
    return ds.filter(lambda r: len(r["turns"]) > 0 and all(t["response"].strip() for t in r["turns"]))


# ---------------------------------------------------------------------------------- tokenisation
def segments(turns: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of a record in the Alpaca template; later turns continue it."""
    out = []
    for k, t in enumerate(turns):
        out.append((t["prompt"] if k == 0 else NEXT_TURN.format(instruction=t["prompt"]), False))
        out.append((t["response"], True))
    return out


def tokenize(turns: list[dict], tokenizer, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (-100 on prompt tokens); each response ends with EOS; truncated to max_length."""
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id], [IGNORE]
    for text, is_response in segments(turns):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_response:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if is_response else [IGNORE] * len(piece)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def build_dataset(name: str, tokenizer, *, n: int | None = None, seed: int = 1234, max_length: int = 256,
                  split: str = "train") -> datasets.Dataset:
    """A tokenised, seeded subsample of n examples that keep at least one response token."""
    if max_length < 8:
        raise DataError(f"max_length={max_length} is too short; use at least 8 tokens")
    if n is not None and n <= 0:
        raise DataError(f"n={n}: the number of examples must be positive")
    records = load_records(name, split).shuffle(seed=seed)
    want = len(records) if n is None else n
    # tokenise in chunks until n examples keep a response token (truncation can leave none)
    parts, kept, start = [], 0, 0
    while kept < want and start < len(records):
        chunk = records.select(range(start, min(len(records), start + max(2 * (want - kept), 64))))
        start += len(chunk)
        part = chunk.map(lambda r: tokenize(r["turns"], tokenizer, max_length), remove_columns=["turns"])
        part = part.filter(lambda r: any(x != IGNORE for x in r["labels"]))
        parts.append(part)
        kept += len(part)
    ds = datasets.concatenate_datasets(parts)
    if n is not None:
        if len(ds) < n:
            raise DataError(f"dataset {name!r} ({split}) has only {len(ds)} usable examples at "
                            f"max_length={max_length}; asked for n={n}")
        ds = ds.select(range(n))
    return ds


def mix_rehearsal(stage2: datasets.Dataset, stage1: datasets.Dataset, fraction: float,
                  seed: int = 1234) -> datasets.Dataset:
    """Stage-2 data plus stage-1 examples making up `fraction` of the mix (Scialom et al. 2022), shuffled."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"rehearsal fraction={fraction}; allowed: 0 <= fraction < 1")
    k = round(fraction * len(stage2) / (1.0 - fraction))
    if k > len(stage1):
        raise DataError(f"rehearsal needs {k} stage-1 examples, only {len(stage1)} given")
    if k == 0:
        return stage2
    cols = ["input_ids", "labels"]
    replay = stage1.shuffle(seed=seed).select(range(k)).select_columns(cols)
    return datasets.concatenate_datasets([stage2.select_columns(cols), replay]).shuffle(seed=seed)


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label -100."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.as_tensor(f["input_ids"])
        labels[i, :n] = torch.as_tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
        except DataError as err:
            return f"unavailable: {err}"
    try:
        return f"hub ({hub_ref(name)})"
    except DataError as err:
        return f"unavailable: {err}"
