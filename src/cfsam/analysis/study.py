"""A preset's frontier study as one typed object: its entries, read once, and the points drawn from them.

Every frontier experiment is one point: a model along a stage-2 run (``specs.frontier``). Against the
stage-1 model it starts from (experiment ``frontier-stage1``):
- **learning** = the fall of the held-out loss on the run's own stage-2 set (nats; up is more learning);
- **forgetting** = the rise of the held-out stage-1 (Alpaca) loss (nats; up is more forgetting).
Per-example losses come from the results (``heldout_loss[set]["per_example"]``), so every measure can be
recomputed on a bootstrap draw of the held-out examples.

A verdict must not hang on how forgetting is defined, so ``measures`` takes any of ``FORGETTING``: the
held-out loss as a token mean (the default) or with every example weighted alike (learning then too), and
the fall of general ability on the frontier's eval suite, per item: the gold answer's log-probability among
the choices (free of choice length and of each task's raw log-prob scale) or the task's accuracy. The eval
items are the same in every run, so they are resampled together, like the held-out examples.

A chapter loads its ``Study`` once (``Study.of(preset)``) and hands it to every function of ``fronts``,
``frontier``, ``verdicts`` and ``snapshots``; each row of their tables names the entries it came from, so a
number is two steps from its ``results/<preset>/<name>.json.gz``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from cfsam.core.errors import UsageError
from cfsam.pipeline import specs
from cfsam.pipeline.cache import load_results
from cfsam.pipeline.schema import Entry

START = "frontier-stage1"

FORGETTING = {
    "heldout": "rise of the held-out stage-1 loss, token mean (nats)",
    "heldout per example": "rise of the held-out stage-1 loss, every example alike; learning likewise (nats)",
    "gold log-prob": "fall of the gold answer's log-probability among the choices, mean over tasks of the "
                     "item mean (nats)",
    "accuracy": "fall of accuracy (each task's primary metric), mean over tasks of the item mean",
}
EVAL_KEYS = {"gold log-prob": "gold_choice_logprob", "accuracy": None}  # None: the task's primary metric


def per_example(entry: Entry, dataset: str) -> np.ndarray:
    """(examples, 2): summed loss and token count of each held-out example."""
    rec = entry["heldout_loss"][dataset]
    if "per_example" not in rec:
        raise UsageError(f"entry {entry.get('name')} has no per-example losses for {dataset}: recompute it")
    return np.asarray(rec["per_example"], dtype=float)


def _eval_items(entry: Entry) -> dict[str, dict]:
    """Per eval task: item indices and per-item values of each eval measure, as arrays (sorted by item)."""
    out = {}
    for task, t in ((entry.get("eval") or {}).get("tasks") or {}).items():
        if t.get("status") != "ok" or not t.get("records"):
            continue
        recs = sorted(t["records"], key=lambda r: r["idx"])
        primary = t["primary"] if t["primary"] in recs[0] else "acc"
        out[task] = {"idx": np.array([r["idx"] for r in recs]),
                     **{m: np.array([float(r[k or primary]) for r in recs]) for m, k in EVAL_KEYS.items()}}
    return out


def stage1_set(entry: Entry) -> str:
    """The stage-1 set an entry's held-out losses were measured on: the first of its sets."""
    return entry["spec"]["measure"]["heldout"]["datasets"][0]


def arrays(entry: Entry) -> Entry:
    """An entry with its per-example losses and eval items as arrays (the bootstrap reads them on every draw)."""
    for rec in (entry.get("heldout_loss") or {}).values():
        if "per_example" in rec:
            rec["per_example"] = np.asarray(rec["per_example"], dtype=float)
    entry["eval_items"] = _eval_items(entry)
    return entry


def family(d: dict) -> str:
    """AdamW, SAM, ASAM, rehearsal, Wise-FT; rehearsal with SAM and Wise-FT of a SAM run are families of their
    own (the paper's complementarity claims compare them with rehearsal and Wise-FT of AdamW)."""
    sam = d["optimizer"] == "sam"
    if d["method"] in ("wise_ft", "rehearsal"):
        return ("sam_" if sam and not d["adaptive"] else "asam_" if sam else "") + d["method"]
    return ("asam" if d["adaptive"] else "sam") if sam else "adamw"


def point_row(name: str, run: dict) -> dict:
    """What places an experiment among the frontier's points: its set, family, setting, lr, seed and at/of."""
    d = specs.describe(run)
    fam = family(d)
    setting = {"adamw": d["lr"], "sam": d["rho"], "asam": d["rho"]}.get(
        fam, d["alpha"] if d["method"] == "wise_ft" else d["rehearsal_fraction"])
    return {"name": name, "dataset": d["stage2"], "family": fam, "setting": setting, "lr": d["lr"],
            "seed": d["seed"], "at": d["at"] or 1, "of": d["of"] or 1}


@dataclass
class Study:
    """A preset's frontier points: the stage-1 entry (key ``"start"``) and every computed point's entry by
    name, with one row per point in ``table`` (name, dataset, family, setting, lr, seed, at, of); ``planned``:
    per stage-2 set, the families the preset plans there, computed or not."""
    preset: str
    entries: dict[str, Entry] = field(default_factory=dict)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    planned: dict[str, set[str]] = field(default_factory=dict)
    _stacked: dict = field(default_factory=dict, repr=False, compare=False)  # see ``_losses``

    @classmethod
    def of(cls, study: Study | str) -> Study:
        """``study`` itself, or the study of the preset it names, read from its results once."""
        if isinstance(study, Study):
            return study
        exps = specs.expand(study)
        every = {n: point_row(n, e["run"]) for n, e in exps.items() if e.get("group") == "frontier" and n != START}
        planned: dict[str, set[str]] = {}
        for r in every.values():
            planned.setdefault(r["dataset"], set()).add(r["family"])
        entries = {n: e for n, e in load_results(study, [START, *every]).items() if e["status"] == "ok"} \
            if START in exps else {}
        if START not in entries:
            return cls(study, planned=planned)
        rows = [r for n, r in every.items() if n in entries]
        out = {"start": entries[START], **{r["name"]: entries[r["name"]] for r in rows}}
        for e in out.values():
            arrays(e)
        return cls(study, out, pd.DataFrame(rows), planned)

    @cached_property
    def layout(self) -> tuple[tuple, tuple, tuple, np.ndarray]:
        """Per point of the table: its name, its own starting model (learning) and the model its forgetting is
        measured from (the study's start unless the table names others: ``starts`` has points from several
        stage-1 models, or the base model), and its stage-2 set; read once, since a bootstrap reads it per draw."""
        t = self.table
        own_start = tuple(t["start"]) if "start" in t else ("start",) * len(t)
        return (tuple(t["name"]), own_start, tuple(t["reference"]) if "reference" in t else own_start,
                t["dataset"].to_numpy())

    @property
    def empty(self) -> bool:
        return self.table.empty

    @property
    def start(self) -> Entry:
        return self.entries["start"]

    @property
    def sets(self) -> list[str]:
        """The stage-2 sets with points, in the table's order."""
        return list(self.table["dataset"].unique()) if not self.empty else []

    @property
    def stage1_set(self) -> str:
        return stage1_set(self.start)

    def only(self, table: pd.DataFrame, extra: dict[str, Entry] | None = None) -> Study:
        """The same study restricted to ``table``'s rows (and their entries); ``extra``: entries of rows that
        are not frontier points (a short run)."""
        entries = {**self.entries, **(extra or {})}
        keep = {"start", *table["name"], *[k for c in ("start", "reference") if c in table for k in table[c]]}
        return Study(self.preset, {k: v for k, v in entries.items() if k in keep}, table, self.planned)

    def suite(self) -> list[str]:
        """The eval tasks every entry scored on the same items (the frontier's suite)."""
        start = self.start["eval_items"]
        tasks = [t for t in start if all(t in e["eval_items"] for e in self.entries.values())]
        for t in tasks:
            for e in self.entries.values():
                if not np.array_equal(e["eval_items"][t]["idx"], start[t]["idx"]):
                    raise UsageError(f"entry {e.get('name')}: task {t} was scored on other items than the "
                                     "stage-1 model's; recompute it")
        return tasks

    def draw_sizes(self, dataset: str, forgetting: str = "heldout") -> dict:
        """What the bootstrap resamples for a measure: held-out sets by name, eval tasks as ("eval", task)."""
        sizes = {dataset: len(per_example(self.start, dataset))}
        if forgetting in EVAL_KEYS:
            sizes.update({("eval", t): len(self.start["eval_items"][t]["idx"]) for t in self.suite()})
        else:
            sizes[self.stage1_set] = len(per_example(self.start, self.stage1_set))
        return sizes


def loss_mean(pe: np.ndarray, idx: np.ndarray, each: bool = False) -> float:
    """The mean loss of the examples ``idx`` of ``per_example``'s array: per token, or ``each`` alike."""
    sub = pe[idx]
    if each:  # every example alike (one with no response token left has none to weigh)
        sub = sub[sub[:, 1] > 0]
        return float(np.mean(sub[:, 0] / sub[:, 1]))
    return float(sub[:, 0].sum() / max(sub[:, 1].sum(), 1.0))


def _weights(draws: dict | None, key, n: int) -> np.ndarray:
    """How often each of ``n`` examples (or items) is in the draw: a draw is a multiset of indices, so a mean
    over it is a weighted mean over all of them (all once when ``draws`` is None)."""
    return np.bincount(draws[key], minlength=n).astype(float) if draws else np.ones(n)


def _losses(study: Study, names: tuple, dataset: str, w: np.ndarray, each: bool) -> np.ndarray:
    """``loss_mean`` of each entry of ``names`` on ``dataset``, for the weights ``w``, as one matrix product
    (the bootstrap draws hundreds of times over the same entries: their stacked arrays are kept)."""
    key = ("heldout", names, dataset, each)
    if key not in study._stacked:
        pe = np.stack([per_example(study.entries[n], dataset) for n in names])  # (entries, examples, 2)
        s, c = pe[..., 0], pe[..., 1]
        if each:  # an example with no response token left has none to weigh
            study._stacked[key] = (np.where(c > 0, s / np.where(c > 0, c, 1.0), 0.0), (c > 0).astype(float), 0.0)
        else:
            study._stacked[key] = (s, c, 1.0)
    num, den, floor = study._stacked[key]
    return (num @ w) / np.maximum(den @ w, floor)


def _ability(study: Study, names: tuple, tasks: list[str], forgetting: str, draws: dict | None) -> np.ndarray:
    """Each entry's mean over ``tasks`` of its mean eval measure over the drawn items."""
    per_task = []
    for t in tasks:
        key = ("eval", names, t, forgetting)
        if key not in study._stacked:
            study._stacked[key] = np.stack([study.entries[n]["eval_items"][t][forgetting] for n in names])
        v = study._stacked[key]
        w = _weights(draws, ("eval", t), v.shape[1])
        per_task.append((v @ w) / w.sum())
    return np.mean(per_task, axis=0)


def measure_arrays(study: Study, draws: dict | None = None, forgetting: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """The learning and the forgetting of every point of the study's table, in its order (``measures``'
    columns, as arrays: what a bootstrap draw needs)."""
    if forgetting not in FORGETTING:
        raise UsageError(f"unknown forgetting measure {forgetting!r}; allowed: {', '.join(FORGETTING)}")
    start, stage1_set = study.start, study.stage1_set
    each = forgetting == "heldout per example"
    tasks = []
    if forgetting in EVAL_KEYS:  # a bootstrap draw names the tasks ``draw_sizes`` checked: not again per draw
        tasks = [k[1] for k in draws if isinstance(k, tuple)] if draws else study.suite()
    if forgetting in EVAL_KEYS and not tasks:
        raise UsageError(f"forgetting measure {forgetting!r} needs eval items in every entry; none are shared")
    names, own_start, reference, own = study.layout
    learn = np.empty(len(names))
    for ds in dict.fromkeys(own):
        rows = np.flatnonzero(own == ds)
        w = _weights(draws, ds, len(per_example(start, ds)))
        learn[rows] = (_losses(study, tuple(own_start[i] for i in rows), ds, w, each)
                       - _losses(study, tuple(names[i] for i in rows), ds, w, each))
    if tasks:
        forget = _ability(study, reference, tasks, forgetting, draws) - _ability(study, names, tasks, forgetting, draws)
    else:
        w = _weights(draws, stage1_set, len(per_example(start, stage1_set)))
        forget = _losses(study, names, stage1_set, w, each) - _losses(study, reference, stage1_set, w, each)
    return learn, forget


def measures(study: Study, draws: dict | None = None, forgetting: str = "heldout") -> pd.DataFrame:
    """The study's table with the learning and forgetting (as ``FORGETTING[forgetting]`` defines it) of every
    point, on the held-out examples and eval items ``draws`` (all when None; keys as ``Study.draw_sizes``)."""
    learn, forget = measure_arrays(study, draws, forgetting)
    out = study.table.copy()
    out["learning"], out["forgetting"] = learn, forget
    return out
