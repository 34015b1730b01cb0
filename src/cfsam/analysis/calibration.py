"""How a preset's start was chosen: stage 1 at each learning rate of ``calibration.stage1_lr`` (``specs.frontier``:
``frontier-stage1-lr<lr>``, measured as ``frontier-stage1`` is), against the base model it starts from.

A start must learn its own set clearly: the fall of its held-out stage-1 loss from the base model's, on the
same held-out examples, with a bootstrap interval over them. Beside it, what stage 1 did to the headline set's
held-out loss (a start that learned Alpaca by unlearning the rest would make every stage-2 run's "learning"
partly a recovery) and the eval suite's accuracy.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cfsam.analysis.study import START, loss_mean, per_example, stage1_set
from cfsam.pipeline import specs
from cfsam.pipeline.cache import load_results
from cfsam.pipeline.presets import load_preset


def _accuracy(entry: dict) -> float:
    """Mean over the eval tasks of each task's primary score."""
    tasks = [t for t in (entry.get("eval") or {}).get("tasks", {}).values() if t.get("status") == "ok"]
    return float(np.mean([t["score"] for t in tasks])) if tasks else np.nan


def starts(preset: str) -> dict[str, float]:
    """{experiment name: stage-1 lr} of the starts compared: ``frontier-stage1`` (the preset's stage1.lr) and
    each calibration run."""
    p, exps = load_preset(preset), specs.expand(preset)
    if START not in exps:
        return {}
    out = {START: p["stage1"]["lr"]}
    out.update({n: e["run"]["lr"] for n, e in exps.items() if e.get("group") == "calibration"})
    return out


def stage1(preset: str, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per stage-1 lr computed: the held-out loss each start lost against the base model on the stage-1
    set (``learned``, with a 95 % bootstrap interval over the held-out examples) and on the headline set
    (negative: stage 1 made it worse), and the eval suite's mean accuracy; ``chosen`` marks the preset's."""
    names = starts(preset)
    if len(names) < 2:  # nothing was calibrated
        return pd.DataFrame()
    entries = {n: e for n, e in load_results(preset, ["base", *names]).items() if e["status"] == "ok"}
    if "base" not in entries or not set(names) & set(entries):
        return pd.DataFrame()
    ds = load_preset(preset)["frontier"]["datasets"][0]
    some = entries[next(n for n in names if n in entries)]
    s1 = stage1_set(some)
    base = {d: per_example(entries["base"], d) for d in (s1, ds)}
    rng = np.random.default_rng(seed)
    k = len(base[s1])
    draws = [rng.integers(0, k, k) for _ in range(n_boot)]
    idx = np.arange(k)
    rows = []
    for name, lr in sorted(names.items(), key=lambda kv: kv[1]):
        if name not in entries:
            continue
        pe = per_example(entries[name], s1)
        boot = [loss_mean(base[s1], d) - loss_mean(pe, d) for d in draws]
        headline = per_example(entries[name], ds)
        rows.append({"lr": lr, "chosen": name == START, f"learned {s1}": loss_mean(base[s1], idx) - loss_mean(pe, idx),
                     "low": float(np.percentile(boot, 2.5)), "high": float(np.percentile(boot, 97.5)),
                     f"learned {ds}": loss_mean(base[ds], np.arange(len(base[ds]))) - loss_mean(
                         headline, np.arange(len(headline))),
                     "eval accuracy": _accuracy(entries[name]), "entries": f"base {name}"})
    return pd.DataFrame(rows).set_index("lr")


def sentence(table: pd.DataFrame) -> str:
    """What each stage-1 lr did to the stage-1 set against the base model, and which the preset uses."""
    if table.empty:
        return ""
    s1 = next(c for c in table.columns if c.startswith("learned ")).removeprefix("learned ")
    said = []
    for lr, r in table.iterrows():
        clear = r["low"] > 0
        said.append(f"at lr {lr:g} stage 1 learned {s1} {r[f'learned {s1}']:+.3f} nats [{r['low']:+.3f}, "
                    f"{r['high']:+.3f}] ({'clearly' if clear else 'not clearly'}"
                    f"{'' if r[f'learned {s1}'] > 0 else '; its held-out loss rose'})")
    chosen = table.index[table["chosen"]]
    text = "Against the base model, " + "; ".join(said) + "."
    if len(chosen):
        lr = chosen[0]
        text += f" The preset's stage 1 uses lr {lr:g}"
        text += "." if table.loc[lr, "low"] > 0 else ", which did not learn its set clearly: its starts are in question."
    return text
