"""One-off migration (2026-11): carry the committed results over to the new experiment ids.

The redesign gave stage specs the trainer's own vocabulary and ids that hash the spec and the measurement
version only (no data hashes, no package version, no paths). An entry is carried over only where its
spec is provably unchanged: its old spec, translated key by key into the new vocabulary, has the same
canonical form as the new preset's spec, *and* every option the old trainer recorded in the entry's own
training metrics (``train.config``) equals the new canonical value. Anything else is left alone, to be
reported stale and recomputed. Run from the repository root: ``python scripts/migrate_ids_2026_11.py cpu``.
"""
import json
import sys

from cfsam.core.io import write_json_atomic
from cfsam.pipeline import cache, specs
from cfsam.training import config

RENAME = {"n": "n_train", "rehearsal": "rehearsal_fraction", "rehearsal_dataset": "rehearsal_from"}


def translate(run: dict) -> dict:
    kind = run["kind"]
    if kind == "base":
        return {"model": run["model"]}
    if kind == "wise_ft":
        return {"wise_ft": {"stage1": translate(run["stage1"]), "stage2": translate(run["stage2"]),
                            "alpha": run["alpha"]}}
    out = {RENAME.get(k, k): v for k, v in run.items() if k not in ("kind", "parent")}
    if kind == "stage2":
        out["model"] = translate(run["parent"])
    if not out.get("rehearsal_fraction"):
        out.pop("rehearsal_fraction", None)
    return out


def recorded_options_agree(entry: dict, new_run: dict) -> bool:
    """The old trainer's own record of every option it used equals the new canonical spec."""
    stage = new_run["wise_ft"]["stage2"] if "wise_ft" in new_run else new_run
    recorded = ((entry.get("train") or {}).get("stage2") or entry.get("train") or {}).get("config")
    if specs.run_kind(stage) != "stage":
        return True
    if not recorded:
        return False
    now = config.canonical(stage)
    keys = [k for k in recorded if k in now and k not in ("model", "data")]
    if "rehearsal" in recorded:
        if recorded["rehearsal"]["fraction"] != now.get("rehearsal_fraction"):
            return False
    return bool(keys) and all(recorded[k] == now[k] for k in keys)


def main(preset: str) -> None:
    exps = specs.expand(preset)
    for name, exp in exps.items():
        path = cache.entry_path(preset, name)
        if not path.exists():
            continue
        entry = json.loads(path.read_text())
        old = entry["spec"]
        if "kind" not in old["run"]:
            print(f"already migrated: {name}")
            continue
        same_run = specs.canonical_run(translate(old["run"])) == specs.canonical_run(exp["run"])
        same = same_run and old["measure"] == exp["measure"] and recorded_options_agree(entry, exp["run"])
        if not same:
            print(f"NOT carried over (spec changed): {name}")
            continue
        entry["migrated"] = {"from_id": entry["id"], "by": "scripts/migrate_ids_2026_11.py",
                             "why": "same spec in the new vocabulary; new id scheme"}
        entry.update(id=specs.experiment_id(exp), spec=exp, measure_version=specs.MEASURE_VERSION)
        write_json_atomic(path, entry)
        print(f"carried over: {name} -> {entry['id']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
