"""What experiments cost, and what the missing ones would: wall time, training (steps, seconds per step,
tokens/s, peak memory) and eval scoring of each computed entry, on the machine that computed it; and an
estimate for the missing ones from the median times of like computed ones."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from cfsam.pipeline import runs, specs
from cfsam.training import config as train_config
from cfsam.pipeline.cache import load_results


def _steps(stage: dict) -> int:
    """Optimizer steps of a resolved training stage: its examples (with a rehearsal mix's replayed ones) in
    batches, times its epochs."""
    from cfsam.data.formatting import rehearsal_count

    n = stage["n_train"] + rehearsal_count(stage["n_train"], stage.get("rehearsal_fraction") or 0.0)
    return -(-n // (stage["batch_size"] * stage["grad_accum"])) * stage["epochs"]


def missing_cost(preset: str, names: list[str]) -> pd.DataFrame:
    """What the experiments of ``names`` without a current result would take, estimated from the current ones
    (on the machines that computed them): each measurement phase (held-out losses, eval, landscape) at the
    median seconds of the current entries that ran the same phase spec, and, for the first experiment that
    needs each training stage (a fresh machine trains every stage once, the parents a run starts from or
    merges with it; ``run-missing`` takes a run's experiments together), the stage's steps at the median
    seconds per step of the current runs with its optimizer.
    NaN where no like experiment is current yet (``like`` says how many phases had one)."""
    exps = {n: e for n, e in specs.expand(preset).items() if n in set(names)}
    entries = load_results(preset, list(exps))
    done = [e for e in entries.values() if e["status"] == "ok"]

    def like(phase: str, spec) -> tuple[tuple, int]:
        """A phase's key for "the same work", and how many units of it the spec asks for: held-out losses
        cost the same per set, whichever the sets are."""
        if phase == "heldout" and isinstance(spec, dict):
            return (phase, json.dumps({k: v for k, v in spec.items() if k != "datasets"}, sort_keys=True)), \
                len(spec["datasets"])
        return (phase, json.dumps(spec, sort_keys=True)), 1

    phase_s: dict[tuple, list[float]] = {}
    per_step: dict[str, list[float]] = {}
    for e in done:
        for phase, sec in (e.get("measure_seconds") or {}).items():
            key, units = like(phase, e["spec"]["measure"].get(phase))
            phase_s.setdefault(key, []).append(sec / units)
        t = e.get("train") or {}
        if t.get("total_steps") and t.get("train_seconds"):
            per_step.setdefault((t.get("config") or {}).get("optimizer"), []).append(t["train_seconds"] / t["total_steps"])
    rows, trained = [], set()
    for name, exp in exps.items():
        if entries[name]["status"] == "ok":
            continue
        phases = [like(p, v) for p, v in exp["measure"].items() if v]
        known = [units * np.median(phase_s[key]) for key, units in phases if key in phase_s]
        measure_s = float(np.sum(known)) if len(known) == len(phases) else np.nan
        train_s = 0.0
        for stage in runs.parse(exp["run"]).stages():  # its own and every parent's (a base model trains nothing)
            rid = specs.run_id(stage)
            if rid not in trained:
                trained.add(rid)
                stage = train_config.resolve(stage)
                rates = per_step.get(stage["optimizer"])
                train_s += _steps(stage) * float(np.median(rates)) if rates else np.nan
        rows.append({"experiment": name, "train_s": train_s, "measure_s": measure_s, "wall_s": train_s + measure_s,
                     "like": f"{len(known)} of {len(phases)} phases"})
    return pd.DataFrame(rows).set_index("experiment") if rows else pd.DataFrame()


def missing_cost_sentence(table: pd.DataFrame) -> str:
    """How long the missing experiments would take by ``missing_cost``, and how many it cannot estimate yet."""
    if table.empty:
        return ""
    known = table["wall_s"].dropna()
    unknown = len(table) - len(known)
    return (f"The {len(table)} experiments still missing here would take about {known.sum() / 3600:.1f} hours"
           + (f" ({len(known)} of them; {unknown} have no like experiment computed yet)" if unknown else "")
           + ", by the median times of the computed experiments that ran the same measurements and optimizer "
             "(a fresh machine trains each run, and each model it starts from, once).") if len(known) else (
        f"The {len(table)} experiments still missing here have no like experiment computed yet to time them by.")


def _busy_seconds(spans: list[tuple[pd.Timestamp, pd.Timestamp]]) -> float:
    """The length of the union of [start, end] spans: overlaps counted once, gaps not at all."""
    busy, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            busy, end = busy + (b - a).total_seconds(), b
        elif b > end:
            busy, end = busy + (b - end).total_seconds(), b
    return busy


def cost(preset: str, names: list[str], *, total: bool = True) -> pd.DataFrame:
    """What each experiment cost on its machine, the one cost table: wall time of the whole experiment
    (training what was not cached yet, merging, measuring), of training its model (steps, seconds per step,
    tokens/s, peak memory) and of its eval scoring; with ``total`` a last row sums the times, which is what
    the preset took, run in the order of ``run-missing``. The points measured along one run (snapshots) share
    its training: the total counts it once. ``machine_s`` (total row) is the time a machine was busy with them:
    the union of their start-to-end spans, less than the sum where ``run-missing --workers`` ran them side by
    side."""
    rows, trained, spans = [], set(), []
    for name, entry in load_results(preset, names).items():
        if entry["status"] != "ok":
            continue
        prov, t = entry.get("provenance", {}), entry.get("train") or {}
        if prov.get("start") and prov.get("end"):
            spans.append((pd.Timestamp(prov["start"]), pd.Timestamp(prov["end"])))
        steps = t.get("total_steps")  # Wise-FT merges and base models train nothing themselves
        first = t.get("run_id") not in trained
        trained.add(t.get("run_id"))
        rows.append({"experiment": name, "optimizer": (t.get("config") or {}).get("optimizer"),
                     "wall_s": prov.get("wall_s"), "train_s": t.get("train_seconds", np.nan), "steps": steps,
                     "_counted_train_s": t.get("train_seconds", np.nan) if first else np.nan,
                     "s_per_step": t["train_seconds"] / steps if steps else np.nan,
                     "tokens_per_s": t.get("tokens_per_s", np.nan),
                     "peak_memory_GB": (t.get("peak_memory_bytes") or np.nan) / 1e9,
                     "eval_s": ((entry.get("eval") or {}).get("timing") or {}).get("seconds"),
                     "device": prov.get("machine", {}).get("device"), "cpu": prov.get("machine", {}).get("cpu")})
    if not rows:  # nothing computed yet: the table's columns all the same, so a chapter can select from it
        return pd.DataFrame(columns=["optimizer", "wall_s", "train_s", "steps", "s_per_step", "tokens_per_s",
                                     "peak_memory_GB", "eval_s", "device", "cpu"])
    df = pd.DataFrame(rows).set_index("experiment")
    counted = df.pop("_counted_train_s")
    if total:
        sums = df[["wall_s", "eval_s"]].sum(min_count=1)
        df.loc["total"] = {**sums.to_dict(), "train_s": counted.sum(min_count=1), "device": "", "cpu": "",
                           "optimizer": ""}
        df["machine_s"] = np.nan
        df.loc["total", "machine_s"] = _busy_seconds(spans) if spans else np.nan
    minutes = ["wall_s", "train_s", "eval_s"] + (["machine_s"] if "machine_s" in df else [])
    df[[m.replace("_s", "_min") for m in minutes]] = df[minutes].astype(float) / 60
    return df
