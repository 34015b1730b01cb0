"""Tables for the notebooks: our cached results as the paper prints them, the paper's numbers beside them.

Each experiment maps to the paper's run key (method, stage2, optimizer, epochs), so a notebook asks for
"Table 2a" and gets, per row of the paper, the paper's value, ours and their difference. Absolute values
are not comparable across models (a 135M model sits near chance where Llama2-7B does not); the
forgetting deltas (a run minus its reference row) are, and the continuous measures (gold log-prob,
held-out loss) show effects that accuracy at chance cannot.
"""
from __future__ import annotations

import base64
import json
import html

import numpy as np
import pandas as pd
from pandas.io.formats.style import Styler

from cfsam.analysis import flatness, paper
from cfsam.pipeline import runs, specs
from cfsam.pipeline.cache import load_results
from cfsam.pipeline.presets import load_preset

CATEGORIES = ["DK", "Understanding", "Reasoning", "Exams", "AVG"]
MMLU_PARTS = {"mmlu_stem": "STEM", "mmlu_humanities": "Humanities", "mmlu_social_sciences": "Social Sciences",
              "mmlu_other": "Other"}
# the paper's task column -> our task name (TruthfulQA: the paper's values match MC1's scale)
PAPER_TASK = {"truthfulqa": "truthfulqa_mc1"}


def run_key(spec: dict) -> dict:
    """The paper's identity of a run: its base model, and method, stage-2 set, optimizer and epochs of the
    last stage."""
    return {"model": runs.parse(spec["run"]).base_model(), **specs.describe(spec["run"])}


def metrics(entry: dict) -> dict[str, float]:
    """Every number of one cached entry, flat, in percent where the paper uses percent."""
    out: dict[str, float] = {}
    ev = entry.get("eval") or {}
    for cat in CATEGORIES:
        score = (ev.get("categories") or {}).get(cat, {}).get("score")
        out[cat] = np.nan if score is None else 100 * score
    mmlu = (ev.get("categories") or {}).get("MMLU") or {}
    for col, sub in MMLU_PARTS.items():
        out[col] = 100 * mmlu[sub] if mmlu.get(sub) is not None else np.nan
    for name, res in (ev.get("tasks") or {}).items():
        ok = res.get("status") == "ok"
        out[name] = 100 * res["score"] if ok else np.nan
        out[f"{name}:gold_logprob"] = res.get("gold_logprob", np.nan) if ok else np.nan
    for col, ours in PAPER_TASK.items():
        out.setdefault(col, out.get(ours, np.nan))
    for ds, v in (entry.get("heldout_loss") or {}).items():
        out[f"loss:{ds}"] = v["loss"]
    flat = (entry.get("landscape") or {}).get("flatness") or {}
    for m, v in flat.items():
        out[m], out[f"{m}:std"] = v["mean"], v.get("std")
    for k, v in ((entry.get("landscape") or {}).get("curvature") or {}).items():
        if isinstance(v, (int, float)):
            out[f"curvature:{k}"] = v
    return out


def frame(preset: str, names: list[str] | None = None) -> pd.DataFrame:
    """One row per experiment: its status, run key and every metric (NaN where missing)."""
    rows = []
    exps = specs.expand(preset)
    for name, entry in load_results(preset, names).items():
        row = {"experiment": name, "status": entry["status"], **run_key(exps[name])}
        if entry["status"] == "ok":  # a stale entry's numbers are never shown as results
            row.update(metrics(entry))
            row["wall_s"] = entry.get("provenance", {}).get("wall_s")
        if entry["status"] != "ok":
            row["command"] = entry["command"]
            row["why"] = entry.get("why", "")
        rows.append(row)
    return pd.DataFrame(rows).set_index("experiment")


def compare(preset: str, table: str, names: list[str], *, paper_model: str = "llama2-7b",
            model: str | None = None) -> pd.DataFrame:
    """The paper's table beside ours: per paper row and metric, the paper's value, ours, ours - paper.

    Rows are matched on (method, stage2, optimizer, epochs), among our runs of ``model`` (default: the
    preset's). Delta is recomputed for our runs with the paper's convention for that table: Table 2's
    (``paper.delta``), or, for Tables 1 and 4, against the Alpaca row. Table 4's AVG is the mean of its two
    tasks, as printed.
    """
    table = str(table)
    ours = frame(preset, names)
    ours = ours[ours["model"] == (model or load_preset(preset)["model"])]
    printed = paper.paper_table(table)
    models = printed.index.get_level_values("model")
    printed = printed[models == (paper_model if paper_model in set(models) else models[0])]
    metric_cols = [c for c in printed.columns if c != "Delta"]
    rows, labels = [], []
    for _, method, stage2, optimizer, epochs in printed.index:
        if not stage2:
            match = ours[ours["kind"] == "stage1"]
        else:
            match = ours[(ours["method"] == method) & (ours["stage2"] == stage2) & (ours["optimizer"] == optimizer)]
            # Table 1 leaves stage 2's epochs unstated: take the preset's default run, not the 1-epoch one
            match = match[~match.index.str.endswith("-e1")] if pd.isna(epochs) else match[match["epochs"] == epochs]
        labels.append(_label(method, stage2, optimizer, epochs))
        rows.append(match.iloc[0] if len(match) else None)

    def ours_value(row, metric):
        if row is None:
            return np.nan
        if table == "4" and metric == "AVG":
            return (row.get("hellaswag", np.nan) + row.get("truthfulqa", np.nan)) / 2
        return row.get({"MMLU": "mmlu"}.get(metric, PAPER_TASK.get(metric, metric)), np.nan)

    out = {}
    for m in metric_cols:
        ours_vals = np.array([ours_value(r, m) for r in rows], dtype=float)
        out[(m, "paper")] = printed[m].to_numpy()
        out[(m, "ours")] = ours_vals
        out[(m, "ours - paper")] = ours_vals - printed[m].to_numpy()
    if "Delta" in printed.columns:
        base_metric = "MMLU" if table == "1" else "AVG"
        ours_base = pd.Series(out[(base_metric, "ours")], index=printed.index)
        if table in ("1", "4"):
            ours_delta = (ours_base - ours_base.iloc[0]).where(np.arange(len(ours_base)) > 0)
        else:
            ours_delta = paper.delta(ours_base)
        out[("Delta", "paper")] = printed["Delta"].to_numpy()
        out[("Delta", "ours")] = ours_delta.to_numpy()
    df = pd.DataFrame(out, index=pd.Index(labels, name="run"))
    df.columns = pd.MultiIndex.from_tuples(df.columns)
    df[("", "experiment")] = [None if r is None else r.name for r in rows]
    df[("", "status")] = [("missing" if r is None else r["status"]) for r in rows]
    return df


def compare_sizes(preset: str, table: str, names: list[str], *, paper_model: str = "llama2-7b") -> pd.DataFrame:
    """``compare`` for each of our model sizes (the preset's model, then its ``sizes``), one block each,
    every row labelled with its model: each block's Delta is against its own model's rows."""
    p = load_preset(preset)
    models = list(dict.fromkeys([p["model"], *p["sizes"]]))
    blocks = []
    for m in models:
        t = compare(preset, table, names, paper_model=paper_model, model=m)
        blocks.append(t.set_axis([f"{m}: {label}" for label in t.index], axis=0).rename_axis("run"))
    return pd.concat(blocks)


def _label(method: str, stage2: str, optimizer: str, epochs) -> str:
    if not stage2:
        return "Alpaca"
    name = {"sharegpt": "ShareGPT", "open-platypus": "Open-Platypus", "metamathqa": "MetaMath",
            "auto-wiki": "Auto-Wiki"}.get(stage2, stage2)
    prefix = {"none": "", "wise_ft": "Wise-FT ", "rehearsal": "Rehearsal "}[method]
    ep = "" if pd.isna(epochs) else f", {int(epochs)} ep"
    return f"{prefix}-> {name} ({'w/' if optimizer == 'sam' else 'w/o'} SAM{ep})"


def missing_note(df: pd.DataFrame, preset: str) -> str:
    """A sentence naming what is missing and the command that computes it (the book never trains)."""
    status = df[("", "status")] if ("", "status") in df else df.get("status")
    missing = df[status != "ok"] if status is not None else df.iloc[0:0]
    if missing.empty:
        return "All results of this page are in the cache."
    counts = missing[status.name if hasattr(status, "name") else "status"].value_counts() if status is not None else {}
    kinds = ", ".join(f"{n} {k}" for k, n in counts.items()) or f"{len(missing)} not current"
    experiment = df[("", "experiment")] if ("", "experiment") in df else pd.Series(df.index, index=df.index)
    damaged = [experiment[i] for i, st in status.items() if st == "damaged"]
    named = (" Damaged (unreadable) entries: " + ", ".join(f"`{n}` (`cfsam run-missing --preset {preset} --only {n}`)"
                                                          for n in damaged) + ".") if damaged else ""
    why = df[("", "why")] if ("", "why") in df else df.get("why")
    retracted = why[why.fillna("").astype(str).str.startswith("retracted")].value_counts() if why is not None else {}
    named += "".join(f" {n} of them {'is' if n == 1 else 'are'} {w.rstrip('.')}." for w, n in retracted.items())
    return (f"{len(missing)} result(s) are not available here ({kinds}); compute them with "
            f"`cfsam run-missing --preset {preset}` (or `make reproduce PRESET={preset}`); `cfsam doctor --preset "
            f"{preset}` says why each is not current.{named}")


def forgetting(preset: str, names: list[str], reference: str = "stage1") -> pd.DataFrame:
    """Per experiment: the change against the reference run of the continuous measures that still move
    when accuracy sits at chance: held-out stage-1 loss and each task's mean gold log-prob."""
    df = frame(preset, names)
    if reference not in df.index or df.loc[reference, "status"] == "missing":
        return pd.DataFrame()
    cols = [c for c in df.columns if c.startswith("loss:") or c.endswith(":gold_logprob") or c in CATEGORIES]
    ref = df.loc[reference, cols].astype(float)
    return df[cols].astype(float).sub(ref, axis=1)


def surfaces(preset: str, names: list[str], seed_index: int = 0) -> dict:
    """The cached loss surfaces (one direction seed) of the given experiments, by experiment name."""
    from cfsam.measurement.landscape import Surface

    out = {}
    for name, entry in load_results(preset, names).items():
        stored = (entry.get("landscape") or {}).get("surfaces") if entry["status"] == "ok" else None
        if stored:
            d = stored[seed_index]
            out[name] = Surface(**{k: np.asarray(v) if k in ("x", "y", "losses") else v for k, v in d.items()})
    return out


def learning_and_forgetting(preset: str, names: list[str], reference: str = "stage1") -> pd.DataFrame:
    """Per stage-2 run, side by side: what it learned (its own held-out loss, down is learning) and what
    it forgot (held-out stage-1 loss and the eval AVG against the reference), with rho and optimizer. A run of
    another size (``<model>/…``) is against that model's own reference (``<model>/stage1``), NaN until it has one."""
    df = frame(preset, names)
    if reference not in df.index or df.loc[reference, "status"] != "ok":
        return pd.DataFrame()
    rows = []
    for name, r in df[df["kind"] == "stage2"].iterrows():
        ref_name = name.rsplit("/", 1)[0] + "/" + reference if "/" in name else reference
        ok = ref_name in df.index and df.loc[ref_name, "status"] == "ok"
        ref = df.loc[ref_name] if ok else pd.Series(dtype=float)
        own = f"loss:{r['stage2']}"
        rows.append({"experiment": name, "status": r["status"], "method": r["method"], "optimizer": r["optimizer"],
                     "rho": r["rho"], "adaptive": r["adaptive"], "epochs": r["epochs"],
                     "learned (Δ own held-out loss)": r.get(own, np.nan) - ref.get(own, np.nan),
                     "forgot (Δ Alpaca held-out loss)": r.get("loss:alpaca", np.nan) - ref.get("loss:alpaca", np.nan),
                     "Δ AVG": r.get("AVG", np.nan) - ref.get("AVG", np.nan)})
    return pd.DataFrame(rows).set_index("experiment") if rows else pd.DataFrame()


def flatness_vs_forgetting(preset: str, names: list[str], *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Over the runs of ``names`` with a landscape, each flatness measure against forgetting (rise of the
    held-out stage-1 loss over the base model's), by ``flatness.correlations``."""
    entries = {n: e for n, e in load_results(preset, names).items() if e["status"] == "ok"}
    s1 = load_preset(preset)["stage1"]["dataset"]
    if "base" not in entries:
        return pd.DataFrame()
    ref = entries["base"]["heldout_loss"][s1]["loss"]
    runs = {n: e for n, e in entries.items() if "landscape" in e}
    forgot = pd.Series({n: e["heldout_loss"][s1]["loss"] - ref for n, e in runs.items()}, dtype=float)
    return flatness.correlations(runs, forgot, n_boot=n_boot, seed=seed)


def preset_note(preset: str) -> str:
    """What the numbers on a page are: the preset, its model, and the data stand-ins it uses."""
    from cfsam.data import sources
    from cfsam.pipeline.presets import load_preset

    p = load_preset(preset)
    sets = [p["stage1"]["dataset"], *p["stage2_datasets"]]
    labels = [f"{s}: {sources.label(s)}" for s in sets if sources.label(s)]
    warn = ("**Smoke preset: a tiny random model. These numbers exercise the pipeline; they are not results.** "
            if preset == "smoke" else "")
    shared = [f"{a} and {b} both draw on {', '.join(f'`{c}`' for c in common)}, so their results are related, not independent"
              for a, b, common in sources.shared_sources(sets)]
    return (f"{warn}Preset `{preset}` ({p['description']}); model `{p['model']}`. "
            + ("Data stand-ins: " + "; ".join(labels) + "." if labels else "")
            + (" Here " + "; ".join(shared) + "." if shared else ""))


class _Shown(Styler):
    """A styled table whose HTML ends with a link that downloads its numbers (full precision) as CSV; the file
    is embedded in the page as a data: URI, so the link works offline and in every build."""
    csv_name = "table"

    def _repr_html_(self):
        csv = base64.b64encode(self.data.to_csv().encode()).decode()
        link = (f'<p class="cfsam-csv"><a download="{html.escape(self.csv_name)}.csv" '
                f'href="data:text/csv;base64,{csv}">Download {html.escape(self.csv_name)}.csv</a></p>')
        return f'<div class="cfsam-table">{self.to_html()}</div>{link}'


# settings spanning decades (a learning rate of 5e-05 is not 0.000), shown as written in the presets
AS_WRITTEN = ("lr", "setting", "rho", "alpha", "rehearsal_fraction")


def show(df: pd.DataFrame, precision: int = 2, name: str = "table"):
    """A results table formatted for the book (NaN shown as a dash; settings as written, ``AS_WRITTEN``), with
    a link to download it as ``name``.csv."""
    styled = _Shown(df).format(precision=precision, na_rep="–")

    def written(v):
        return f"{v:g}" if isinstance(v, (int, float, np.floating)) and v == v else ("–" if v != v else str(v))

    cols = [c for c in df.columns if c in AS_WRITTEN and pd.api.types.is_numeric_dtype(df[c])]
    if cols:
        styled = styled.format(written, subset=cols)
    for level, label in enumerate(df.index.names):
        if label in AS_WRITTEN:
            styled = styled.format_index(written, level=level)
    styled.csv_name = name
    return styled


def flatness_table(preset: str, names: list[str]) -> pd.DataFrame:
    """The paper's flatness metrics (mean and std over direction seeds), the curvature measures beyond
    them, and the held-out Alpaca loss of each run with a landscape."""
    curvature = [f"curvature:{key}" for part, key in flatness.FLATNESS.values() if part == "curvature"]
    cols = ["SC", "SC:std", "AG", "AG:std", "MAG", "MAG:std", *curvature, "loss:alpaca"]
    return frame(preset, names).reindex(columns=["status", *cols])
