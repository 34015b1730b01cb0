"""The task screen: which general-ability tasks the base model is above chance on (the frontier's suite is
chosen from them: a task at chance cannot show forgetting)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cfsam.pipeline import specs
from cfsam.pipeline.cache import load_results
from cfsam.pipeline.presets import load_preset


def screen(preset: str) -> pd.DataFrame:
    """The screening run: each task's accuracy of the base model against chance (1 / choices, per item), with
    a normal 95 % interval over items; ``above chance`` when the interval lies above it."""
    entry = load_results(preset, ["screen"])["screen"] if "screen" in specs.expand(preset) else {"status": "missing"}
    if entry["status"] != "ok":
        return pd.DataFrame()
    rows = []
    for name, t in entry["eval"]["tasks"].items():
        if t.get("status") != "ok":
            rows.append({"task": name, "status": t.get("status")})
            continue
        recs = t["records"]
        key = t["primary"] if t["primary"] in recs[0] else "acc"
        acc = np.array([float(r[key]) for r in recs])
        chance = float(np.mean([1.0 / len(r["ll"]) for r in recs]))
        se = acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else np.nan
        low, high = acc.mean() - 1.96 * se, acc.mean() + 1.96 * se
        rows.append({"task": name, "status": "ok", "items": len(acc), "metric": key, "score": acc.mean(),
                     "low": low, "high": high, "chance": chance, "above chance": bool(low > chance)})
    return pd.DataFrame(rows).set_index("task")


def screen_sentence(preset: str, table: pd.DataFrame) -> str:
    """Which screened tasks are above chance, which of them the frontier's suite uses, and any it leaves out
    or holds without the screen's warrant."""
    if table.empty or "above chance" not in table:
        return ""
    suite = load_preset(preset)["frontier"]["eval"]["tasks"]
    above = [t for t in table.index if table.loc[t, "above chance"] == True]  # noqa: E712 (NaN: not scored)
    text = (f"Above chance by their interval: {', '.join(above) or 'none'} ({len(above)} of {len(table)} screened). "
            f"The frontier's suite: {', '.join(suite)}.")
    left, unwarranted = [t for t in above if t not in suite], [t for t in suite if t in table.index and t not in above]
    if left:
        text += (f" Also above chance but not in the suite: {', '.join(left)}; the suite was fixed in the"
                 " preset before this screen and the first frontier run were computed, and widening it now would make"
                 " every computed point stale.")
    if unwarranted:
        text += f" In the suite without being above chance here: {', '.join(unwarranted)}."
    return text
