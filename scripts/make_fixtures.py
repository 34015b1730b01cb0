"""Write the test fixtures: small copies of the data mirror's layout, read from the mirror.

    python scripts/make_fixtures.py [--mirror ../shared/data] [--out tests/fixtures/data]

Every file the dataset registry (src/cfsam/registry/datasets.yaml) reads from the mirror gets a copy of its
first records, at the same path and in the same format (JSON list or JSON lines, gzip, header-less CSV/TSV,
llama.cpp's 6-line HellaSwag text in bz2, sidecar label files), so the loaders read the fixtures exactly as they
read the mirror. The output also holds a MANIFEST.md in the mirror's table format (records, bytes and sha256
of each fixture file, its source and licence) and FIXTURES.md, which marks the folder as test data: results
are never checked against it (``cfsam.data.sources.is_fixture_data``).

Licences: each set's own terms apply to its excerpt (listed per file in MANIFEST.md). ShareGPT has no known
licence, so its fixture keeps the conversations' structure (ids, roles, turn counts) with placeholder text.
The output is deterministic: the same mirror gives the same bytes.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import glob
import gzip
import hashlib
import io
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "src" / "cfsam" / "registry" / "datasets.yaml"

# Records per file. Training sets: enough for the smoke preset's n_train=16 and a 5 % held-out slice of at
# least 12 (8 held-out examples, then disjoint landscape examples). Eval sets: a few dozen. MMLU: per subject,
# dev keeps the 5 few-shot examples; the stratified-sampling tests need every subject in test.
TRAIN_RECORDS = 240
EVAL_RECORDS = 40
MATH_PER_FILE = 80  # x 7 subject files
SMALL_SPLIT_RECORDS = 6  # a training set's test split, which only the data hashes read
MMLU_RECORDS = {"dev": 5, "val": 2, "test": 4}
WIKIAUTO_REFS = 8  # valid.tsv: 8 reference simplifications (lines) per source sentence
PLACEHOLDER_ONLY = {"sharegpt"}  # no known licence: structure kept, text replaced


def read_manifest(path: Path) -> dict[str, list[str]]:
    """local file -> the cells of its row in the mirror's MANIFEST.md table."""
    out = {}
    for row in path.read_text().splitlines():
        cells = [c.strip() for c in row.split("|")]
        if len(cells) > 9 and cells[2].startswith("`"):
            out[cells[2].strip("`")] = cells[1:10]
    return out


def _json_records(text: str) -> tuple[list, bool]:
    """The records of a JSON list or JSON-lines text, and whether it was a list."""
    if text.lstrip().startswith("["):
        return json.loads(text), True
    return [line for line in text.splitlines() if line.strip()], False  # lines kept verbatim


def _placeholder(conv: dict, k: int) -> dict:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    turns = []
    for t, turn in enumerate(conv.get("conversations", [])):
        n = min(60, max(3, len(str(turn.get("value", "")).split())))
        text = " ".join(words[(k + t + i) % len(words)] for i in range(n))
        turns.append({**turn, "value": f"Placeholder turn {t} of fixture conversation {k}: {text}."})
    return {"id": conv.get("id", f"fixture-{k}"), "conversations": turns}


def cut_json(data: bytes, n: int, name: str, gz: bool) -> tuple[bytes, int]:
    text = (gzip.decompress(data) if gz else data).decode("utf-8")
    records, is_list = _json_records(text)
    records = records[:n]
    if name in PLACEHOLDER_ONLY:
        records = [_placeholder(r if is_list else json.loads(r), k) for k, r in enumerate(records)]
        out = json.dumps(records, ensure_ascii=False) if is_list else "\n".join(json.dumps(r) for r in records) + "\n"
    elif is_list:
        indent = 2 if text.lstrip("[ \t").startswith("\n") else None  # keep the file's layout roughly
        out = json.dumps(records, ensure_ascii=False, indent=indent)
    else:
        out = "\n".join(records) + "\n"
    raw = out.encode("utf-8")
    return (gzip.compress(raw, mtime=0) if gz else raw), len(records)


def cut_csv(data: bytes, n: int) -> tuple[bytes, int]:
    # records may span lines (quoted newlines in MMLU questions): parse, then write back
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))[:n]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8"), len(rows)


def cut_lines(data: bytes, n_lines: int) -> bytes:
    return b"".join(data.splitlines(keepends=True)[:n_lines])


def make(mirror: Path, out: Path) -> list[dict]:
    registry = yaml.safe_load(REGISTRY.read_text())
    manifest = read_manifest(mirror / "MANIFEST.md")
    rows = []
    for name, spec in registry.items():
        if "files" not in spec:
            continue  # a set the mirror lacks (or a substitute of registered sets)
        for split, patterns in spec["files"].items():
            for pattern in patterns:
                hits = sorted(glob.glob(str(mirror / pattern)))
                if not hits:
                    sys.exit(f"{mirror / pattern}: no such file in the mirror (the registry lists it)")
                for hit in hits:
                    rel = Path(hit).relative_to(mirror).as_posix()
                    rows.append(_write(mirror, out, rel, name, split, spec, manifest))
            label_file = spec.get("labels", {}).get(split)
            if label_file:  # one label per record of the split's (single) file
                n = rows[-1]["records"]
                data = cut_lines((mirror / label_file).read_bytes(), n)
                rows.append(_save(out, label_file, data, n, name, f"{split} labels", manifest))
    return rows


def _write(mirror: Path, out: Path, rel: str, name: str, split: str, spec: dict, manifest: dict) -> dict:
    data = (mirror / rel).read_bytes()
    fmt = spec["format"]
    if spec["kind"] == "train":
        n = SMALL_SPLIT_RECORDS if split != "train" else TRAIN_RECORDS
        if name == "math":  # seven subject files make one split; at max_length=128 about half the problems
            n = MATH_PER_FILE if split == "train" else 1  # leave no response token: twice the share each
    else:
        n = EVAL_RECORDS
    if fmt == "json":
        data, count = cut_json(data, n, name, rel.endswith(".gz"))
    elif fmt == "csv_noheader":  # MMLU: per subject file
        data, count = cut_csv(data, MMLU_RECORDS[rel.split("/")[2]])
    elif fmt == "tsv_noheader":
        per = WIKIAUTO_REFS if spec.get("dedupe") else 1
        data = cut_lines(data, n * per)
        count = n * per
    elif fmt == "hellaswag6":
        data = bz2.compress(cut_lines(bz2.decompress(data), 6 * n))
        count = n
    else:
        sys.exit(f"dataset {name!r}: unknown format {fmt!r}")
    return _save(out, rel, data, count, name, split, manifest)


def _save(out: Path, rel: str, data: bytes, count: int, name: str, split: str, manifest: dict) -> dict:
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    src = _manifest_row(rel, manifest)
    return {"dataset": name, "file": rel, "split": split, "records": count, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "source": src[2] if src else "?",
            "licence": src[8] if src else "?", "placeholder": name in PLACEHOLDER_ONLY}


def _manifest_row(rel: str, manifest: dict) -> list[str] | None:
    if rel in manifest:
        return manifest[rel]
    for key, row in manifest.items():  # a grouped row: `mmlu/data/{dev,val,test}/*.csv`
        pattern = re.sub(r"\{([^}]*)\}", lambda m: "(" + m.group(1).replace(",", "|") + ")", key)
        if re.fullmatch(pattern.replace(".", r"\.").replace("*", "[^/]*"), rel):
            return row
    return None


HEADER = """# Test fixtures: a small copy of the data mirror's layout

Written by `scripts/make_fixtures.py` from the data mirror (its MANIFEST.md names each file's source); run it
again to regenerate them. Each file holds the first records of the mirror's file of the same path, in the same
format (MMLU: the first {mmlu} records of each subject's dev/val/test file; Wiki-Auto: whole sentences, 8
reference lines each; HellaSwag: whole 6-line items). They are for tests only: the loaders read them when
`CFSAM_DATA_DIR` points here (tests/conftest.py does so when no mirror is configured), and results are never
checked against them (`FIXTURES.md` marks the folder).

## Licences
Each excerpt stays under its data set's own terms, listed per file below (from the mirror's MANIFEST.md), with
its source named as attribution. In particular: the CC-BY-SA excerpts (BoolQ, ARC, Wiki-Auto) are shared
under the same licence; Alpaca (CC-BY-NC-4.0) and RACE (non-commercial research only) may be used for
non-commercial purposes only; ShareGPT has no known licence, so its fixture holds no text of it: the first
conversations' ids, roles and turn counts, with placeholder text.

"""


def write_manifest(out: Path, rows: list[dict]) -> None:
    table = ["| dataset | local file | source (mirror file, from) | path in source | split | records | bytes | "
             "sha256 | licence |", "|---|---|---|---|---|---|---|---|---|"]
    mmlu = [r for r in rows if r["dataset"] == "mmlu"]
    for r in rows:
        if r["dataset"] == "mmlu":
            continue
        src = "placeholder text, structure of the mirror's file" if r["placeholder"] else "excerpt of the mirror's file"
        table.append(f"| {r['dataset']} | `{r['file']}` | {src}, from {r['source']} | `{r['file']}` | {r['split']} | "
                     f"{r['records']} | {r['bytes']} | `{r['sha256']}` | {r['licence']} |")
    if mmlu:  # one grouped row, as in the mirror's MANIFEST.md (no size check for a pattern)
        by_split = {s: sum(r["records"] for r in mmlu if r["split"] == s) for s in ("dev", "validation", "test")}
        table.append(f"| mmlu | `mmlu/data/{{dev,val,test}}/*.csv` | excerpt of the mirror's files, from "
                     f"{mmlu[0]['source']} | `mmlu/data/` | dev/val/test | dev {by_split['dev']} / val "
                     f"{by_split['validation']} / test {by_split['test']} ({len(mmlu) // 3} subjects x3 CSVs, no "
                     f"header) | {sum(r['bytes'] for r in mmlu)} | - | {mmlu[0]['licence']} |")
    counts = "/".join(str(MMLU_RECORDS[s]) for s in ("dev", "val", "test"))
    (out / "MANIFEST.md").write_text(HEADER.format(mmlu=counts) + "\n".join(table) + "\n")
    (out / "FIXTURES.md").write_text(
        "This folder holds test fixtures, not the data sets: a few records of each file of the data mirror\n"
        "(see MANIFEST.md). cfsam treats a CFSAM_DATA_DIR holding this file as test data: results are never\n"
        "checked against it, so committed results do not turn stale where it is used.\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mirror", type=Path, default=REPO.parent / "shared" / "data", help="the data mirror")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "data")
    args = ap.parse_args(argv)
    if not (args.mirror / "MANIFEST.md").is_file():
        ap.error(f"--mirror {args.mirror}: no MANIFEST.md there; point it at the data mirror")
    if args.out.exists() and not (args.out / "FIXTURES.md").exists() and any(args.out.iterdir()):
        ap.error(f"--out {args.out} holds files that are not fixtures; choose an empty folder")
    rows = make(args.mirror, args.out)
    write_manifest(args.out, rows)
    total = sum(r["bytes"] for r in rows)
    print(f"{len(rows)} files, {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
