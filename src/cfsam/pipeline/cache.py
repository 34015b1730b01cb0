"""The results cache: ``results/<preset>/<name>.json``, one entry per experiment (``cfsam.pipeline.schema``).

An entry is *current* (status ``ok``) when its id equals the experiment's id (its spec's hash and the
measurement version). The data hashes in its provenance are checked where the data is present: a
mismatch makes it ``stale``; where the data is absent it stays ``ok`` with ``data_verified: False``
("data not verified here"). A file that cannot be read is ``damaged`` (with the file and the parse
error), never a crash: one bad entry blocks nothing else. Reading needs neither the data nor torch.

An entry found wrong after it was written is *retracted* in ``results/<preset>/retracted.yaml`` (by name,
with its id and its provenance start, and a reason): it reads ``stale`` with that reason until a run
recomputes it (a new entry has another start), so its numbers are never shown as results and the file
stays as evidence. A measurement-version change would do the same to every preset's entries.
"""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

from cfsam.core.errors import UsageError
from cfsam.core.io import config_hash, read_json
from cfsam.pipeline.presets import preset_name
from cfsam.pipeline.specs import expand, experiment_id

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
STATUSES = ("ok", "stale", "missing", "damaged")


def results_dir(preset: str) -> Path:
    root = Path(os.environ.get("CFSAM_RESULTS", REPO / "results"))
    return root / preset_name(preset)  # a YAML path: its stem, never the path itself


def entry_path(preset: str, name: str) -> Path:
    """Where an experiment's entry is written: gzip-compressed JSON (per-item records make an entry up to
    a few MB of text, a tenth of that compressed)."""
    return results_dir(preset) / f"{name}.json.gz"


def find_entry(preset: str, name: str) -> Path | None:
    """The file holding an experiment's entry: the compressed one, else a plain ``.json`` (entries written
    before compression, or copied by hand), else None."""
    for path in (entry_path(preset, name), results_dir(preset) / f"{name}.json"):
        if path.exists():
            return path
    return None


def missing_command(preset: str, name: str) -> str:
    return f"cfsam run-missing --preset {preset} --only {name}"


def datasets_of(spec) -> set[str]:
    """The training and held-out sets a spec reads (eval tasks are listed under measure.eval)."""
    found = set()
    if isinstance(spec, dict):
        for k, v in spec.items():
            if k in ("dataset", "rehearsal_from") and isinstance(v, str):
                found.add(v)
            elif k == "datasets" and isinstance(v, list):
                found |= set(v)
            else:
                found |= datasets_of(v)
    return found


def data_hashes(exp: dict) -> dict[str, dict]:
    """sha256 of every data file an experiment reads; sets of many files (MMLU) as one digest of them."""
    from cfsam.data import sources
    from cfsam.evaluation import tasks

    def compact(files: dict) -> dict:
        if len(files) <= 4:
            return files
        return {f"{len(files)} files": config_hash(files, 64)}

    out = {name: compact(sources.file_hashes(name)) for name in sorted(datasets_of(exp))}
    for task in exp.get("measure", {}).get("eval", {}).get("tasks", []):
        out[f"task:{task}"] = compact(tasks.data_hashes(task))
    return out


def data_present() -> bool:
    """Whether this machine reads the data mirror, so that data hashes can be checked here."""
    if not os.environ.get("CFSAM_DATA_DIR"):
        return False
    from cfsam.data import sources

    # the test fixtures are a mirror to read, not the data that committed results were computed on
    return sources.use_mirror() and not sources.is_fixture_data()


RETRACTED = "retracted.yaml"


def retractions(preset: str) -> dict[str, dict]:
    """{name: {"id", "start", "reason"}} of a preset's retracted entries (none without the file); a malformed
    file is a ValueError naming it and the form it must have."""
    import yaml

    path = results_dir(preset) / RETRACTED
    if not path.exists():
        return {}
    form = "a list of {reason: text, entries: {name: {id: ..., start: ...}}}"
    try:
        groups = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"{path}: {type(err).__name__}: {err}; it must be {form}") from err
    out = {}
    for group in groups or []:
        if not (isinstance(group, dict) and isinstance(group.get("reason"), str) and isinstance(group.get("entries"), dict)
                and all(isinstance(v, dict) and {"id", "start"} <= set(v) for v in group["entries"].values())):
            raise UsageError(f"{path}: {str(group)[:120]!r} is not {form}")
        for name, which in group["entries"].items():
            out[name] = {"id": which["id"], "start": str(which["start"]), "reason": " ".join(group["reason"].split())}
    return out


def read_entry(path: Path) -> dict:
    """A cache file's entry, or ValueError naming the file and what is wrong with it."""
    try:
        entry = read_json(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: {type(err).__name__}: {err}") from err
    if not isinstance(entry, dict) or "id" not in entry:
        raise UsageError(f"{path}: not a results entry (a JSON object with an id), got {type(entry).__name__}")
    return entry


def check_known(preset: str, names: list[str], exps: dict) -> None:
    """A clear error for names the preset does not have: the closest names it has, not all of its hundreds
    (a frontier run is measured at its points, ``<run>-1of4`` ..., so a run's own name is the usual slip)."""
    unknown = [n for n in names if n not in exps]
    if not unknown:
        return
    hints = []
    for n in unknown:
        points = [e for e in exps if e.startswith(f"{n}-") and e[len(n) + 1:].partition("of")[0].isdigit()]
        near = points or difflib.get_close_matches(n, list(exps), n=3, cutoff=0.8)
        hints.append(f"{n!r} (" + (f"did you mean {', '.join(near)}?" if near else "no close name") + ")")
    raise UsageError(f"unknown experiment(s) in preset {preset!r}: {'; '.join(hints)}; "
                     f"all {len(exps)} names: cfsam status --preset {preset}")


def load_results(preset: str, names: list[str] | None = None, *, verify_data: bool | None = None) -> dict[str, dict]:
    """Entries by name, each with ``status`` (ok, stale, missing, damaged); stale and damaged ones with ``why``;
    every one not ok with the ``command`` that recomputes it."""
    exps = expand(preset)
    verify = data_present() if verify_data is None else verify_data
    retracted = retractions(preset)
    out = {}
    check_known(preset, names or [], exps)
    for name in names or list(exps):
        out[name] = _status(preset, name, exps[name], verify, retracted.get(name))
    return out


def status_of(preset: str, name: str, exp: dict) -> str:
    """One experiment's status against the spec ``exp`` a running process holds (not the preset file as it
    reads now: a preset edited while ``run-missing`` runs must neither stop it nor change what it computes)."""
    return _status(preset, name, exp, data_present(), retractions(preset).get(name))["status"]


def _status(preset: str, name: str, exp: dict, verify: bool, retracted: dict | None = None) -> dict:
    path = find_entry(preset, name)
    command = missing_command(preset, name)
    if path is None:
        return {"name": name, "status": "missing", "command": command}
    try:
        entry = read_entry(path)
    except ValueError as err:
        log.warning("result %s is damaged: %s", path, err)
        return {"name": name, "status": "damaged", "why": str(err), "command": command, "path": str(path)}
    current = experiment_id(exp)
    entry.update(status="ok", data_verified=False)
    if entry["id"] != current:
        entry.update(status="stale", why=f"the spec changed (cached id {entry['id']}, current {current})")
    elif retracted and (retracted["id"], retracted["start"]) == (entry["id"], entry.get("provenance", {}).get("start")):
        entry.update(status="stale", why=f"retracted ({RETRACTED}): {retracted['reason']}")
    elif verify:
        then, now = entry.get("provenance", {}).get("data", {}), data_hashes(exp)
        changed = sorted(k for k in now if then.get(k) != now[k])
        if changed:
            entry.update(status="stale", why=f"its data files differ from the ones here: {', '.join(changed)}")
        else:
            entry["data_verified"] = True
    if entry["status"] != "ok":
        entry["command"] = command
    return entry


def check(preset: str) -> list[dict]:
    """Every entry of a preset with its status, any result file that belongs to no experiment, and any
    temporary file a cut-short write left."""
    results = load_results(preset)
    rows = [{"name": n, "status": e["status"], "why": e.get("why", ""), "data_verified": e.get("data_verified"),
             "command": e.get("command", "")} for n, e in results.items()]
    folder = results_dir(preset)
    known = {f"{n}{suffix}" for n in results for suffix in (".json", ".json.gz")}
    for extra in sorted([*folder.glob("*.json"), *folder.glob("*.json.gz")]) if folder.is_dir() else []:
        if extra.name not in known:
            rows.append({"name": extra.name.split(".json")[0], "status": "orphan", "why": f"{extra} is no experiment of {preset}",
                         "data_verified": None, "command": ""})
    # what an atomic write leaves when it is cut short (a kill, a full disk): never an entry, always safe to
    # delete once no run-missing is writing there
    for tmp in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
        rows.append({"name": tmp.name, "status": "temporary", "data_verified": None, "command": "",
                     "why": f"a partial file of a write that was cut short: delete it with `rm {tmp}`"})
    return rows
