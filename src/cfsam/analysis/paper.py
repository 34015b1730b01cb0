"""The paper's reported numbers, as data: every number of Tables 1-8 of Li et al. (2024), "Revisiting
Catastrophic Forgetting in Large Language Model Tuning", transcribed from ../shared/paper/ into
``registry/paper_numbers.csv`` so that notebooks put them beside ours from one place.

The file is tidy and long, one printed number a row:

* ``table``      1, 2a, 2b, 2c, 3, 4, 5a..8c (Tables 5-8 are split by task group: a MMLU, b Understanding
  and Exams, c Reasoning; their rows are the same runs)
* ``model``      tinyllama-1.1b | llama2-7b | llama2-13b (as ``registry/models.yaml``)
* ``method``     none | wise_ft | rehearsal (Tables 7-8 print Wise-FT as "Wife-FT")
* ``stage2``     the set tuned on after Alpaca: sharegpt | open-platypus | metamathqa | auto-wiki, or empty for
  the Alpaca model itself
* ``optimizer``  stage 2's: adamw (the paper's "w/o" SAM) | sam ("w/"); on the Alpaca row, stage 1's (adamw)
* ``epochs``     of that stage: Alpaca 3, w/o 2, w/ 1 (the paper's "balanced training cost"; Tables 3 and 5
  add w/o at 1); missing where the paper does not say (Table 1's stage 2)
* ``metric``     Table 1: SC AG MAG MMLU Delta; Tables 2-3: DK Understanding Reasoning Exams AVG Delta;
  Table 4: hellaswag truthfulqa AVG Delta; Tables 5-8: cfsam's eval task names (mmlu_stem .. siqa)
* ``value``      as printed, in %
* ``note``       a caveat, or why a number does not reproduce from the others

How the numbers relate (``tests/test_paper.py`` checks each to rounding):

* DK is MMLU's unweighted mean over its 57 subjects: the mean of the STEM / Humanities / Social Sciences /
  Other columns weighted by their subject counts 18/13/12/14, not the plain mean of the four.
* Understanding = mean(race_middle, race_high, openbookqa_fact, csl_dev); Reasoning = mean(boolq, axb, axg,
  rte, copa, hellaswag, siqa); Exams = arc_c; AVG = mean of the four categories (Table 4: of its two tasks).
* Table 2's Delta is AVG minus a reference row's AVG: a w/o row against its model's Alpaca row, a w/ row
  against its w/o twin (``delta``). Table 1's and Table 4's Delta are against the Alpaca row (both rows).

Where the paper disagrees with itself:

* Table 2b, TinyLlama ->Open-Platypus (w/): DK 23.14 is the plain mean of Table 6a's four columns; the
  subject-weighted mean, which every other row follows, gives 23.06. Its AVG and Delta follow from 23.14.
* Table 1's ->Open-Platypus MMLU (33.46) is not Table 2/3's DK of that setting (31.13 at 2 epochs, 29.89
  at 1): a different run, its epochs unstated.
* The text of §5 gives "Delta Mitigating CF ... Rehearsal: 3.79%", but Table 2c gives 48.09 - 45.22 = 2.87
  (3.79 is Meta-Math's Delta in Table 2a).
"""
from __future__ import annotations

from cfsam.core import registry
from cfsam.core.errors import UsageError

from functools import lru_cache

import numpy as np
import pandas as pd

CSV = registry.ROOT / "paper_numbers.csv"
KEY = ["model", "method", "stage2", "optimizer", "epochs"]  # one run
TABLES = ("1", "2a", "2b", "2c", "3", "4", "5", "6", "7", "8")  # as paper_table prints them


@lru_cache(maxsize=1)
def _load() -> pd.DataFrame:
    # all text except epochs (empty = unstated) and value; keep "" as "" (the Alpaca row's stage2)
    dtype = {c: str for c in ("table", "model", "method", "stage2", "optimizer", "metric", "note")}
    return pd.read_csv(CSV, dtype={**dtype, "epochs": "Int64", "value": float},
                       keep_default_na=False, na_values={"epochs": [""]})


def paper_numbers(table: str | int | None = None) -> pd.DataFrame:
    """The paper's numbers, long; ``table`` picks one table ("2a") or all sub-tables of one ("2", 5)."""
    df = _load()
    if table is None:
        return df.copy()
    table = str(table)
    sel = df[(df["table"] == table) | (df["table"].str[:-1] == table)]
    if sel.empty:
        raise UsageError(f"unknown table {table!r}: the paper has {', '.join(df['table'].unique())} "
                         f"(a bare number selects all its sub-tables)")
    return sel.reset_index(drop=True)


def paper_table(table: str | int) -> pd.DataFrame:
    """One table as the paper prints it: a row per run (indexed by KEY, in the paper's order) and a
    column per metric (in the paper's order). Tables 5-8 join their sub-tables into one row per run."""
    long = paper_numbers(table)
    if long.duplicated(KEY + ["metric"]).any():
        raise UsageError(f"table {table!r} repeats runs across its sub-tables; pick one of {', '.join(TABLES)}")
    wide = long.set_index(KEY + ["metric"])["value"].unstack("metric")
    rows = pd.MultiIndex.from_frame(long[KEY].drop_duplicates())
    return wide.reindex(index=rows, columns=long["metric"].unique())


def delta(avg: pd.Series) -> pd.Series:
    """Table 2's Delta for AVG values indexed by KEY: a w/o (adamw) row minus its model's Alpaca row (empty
    stage2), a w/ (sam) row minus its w/o twin (same model, method, stage2); NaN on the Alpaca row."""
    keys = avg.index.to_frame(index=False)
    out = []
    for i, run in keys.iterrows():
        if run["stage2"] == "":
            out.append(np.nan)
            continue
        same_model = keys["model"] == run["model"]
        if run["optimizer"] == "adamw":
            ref = same_model & (keys["stage2"] == "")
        else:
            ref = (same_model & (keys["method"] == run["method"]) & (keys["stage2"] == run["stage2"])
                   & (keys["optimizer"] == "adamw"))
        if ref.sum() != 1:
            raise UsageError(f"run {tuple(run)} needs exactly one reference row for Delta, "
                             f"found {int(ref.sum())}: {keys[ref].to_dict('records')}")
        out.append(avg.iloc[i] - avg[ref.to_numpy()].iloc[0])
    return pd.Series(out, index=avg.index, name="Delta")
