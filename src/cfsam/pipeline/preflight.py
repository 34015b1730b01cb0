"""What would stop ``run-missing`` part way, checked before its first experiment: the results folder and the
model cache can be written, and every experiment's data sizes fit its data (``n_train``, the rehearsal
share, the held-out and landscape examples). The preset's keys are checked when it loads
(``presets.load_preset``) and every stage spec when the experiment ids are computed; what is left needs the
data's record counts, read here once per set (the records are cached for the training that follows).
And what this machine cannot compute at all (``unreachable``): a set or a base model that cannot be had here,
which ``run-missing`` reports and skips rather than fails.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cfsam.core.errors import UsageError
from cfsam.core.io import free_space
from cfsam.data import formatting, models, sources
from cfsam.pipeline import runs
from cfsam.pipeline.cache import datasets_of, results_dir
from cfsam.training.config import resolve


class PreflightError(UsageError):
    """Something that would stop the run later, named with the value and what would fit."""


def check(preset: str, exps: dict[str, dict], names: list[str]) -> None:
    """Every check below, over the experiments ``names`` of ``exps``; raises PreflightError on the first."""
    if not names:
        return
    writable(results_dir(preset), "the results folder", "CFSAM_RESULTS")
    writable(models.cache_dir() / "runs", "the model cache", "CFSAM_CACHE")
    data_sizes(exps, names)


def writable(folder: Path, what: str, env: str) -> None:
    """``folder`` exists (made if not) and takes a file: tried with a small one that is removed again."""
    probe = folder / f".write-check.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"cfsam")
        probe.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise PreflightError(f"{what} {folder} cannot be written ({err.strerror or err}; "
                             f"{free_space(folder)}): set {env} to a writable folder") from err


def data_sizes(exps: dict[str, dict], names: list[str]) -> None:
    """Each experiment asks no more examples of a set than the set has (its records before tokenising: an
    upper bound on the usable ones, so what passes here can still fall short by the truncated examples)."""
    counts: dict[tuple[str, str], int] = {}

    def records(name: str, split: str) -> int:
        if (name, split) not in counts:
            counts[name, split] = len(formatting.load_records(name, split))
        return counts[name, split]

    def need(name: str, split: str, n: int, what: str, exp: str, after: int = 0) -> None:
        """``after``: examples the setting's own come after (a disjoint landscape's, after the held-out ones)."""
        have = records(name, split)
        if after + n > have:
            past = f", and its come after the first {after}" if after else ""
            raise PreflightError(f"experiment {exp}: {what}={n} but {name!r} has only {have} {split} examples"
                                 f"{past}; lower {what} to at most {max(have - after, 0)}")

    for exp in names:
        spec = exps[exp]
        for stage in runs.parse(spec["run"]).stages():
            kw = resolve(stage)
            if not isinstance(kw["dataset"], str):
                continue
            n = kw["n_train"] or records(kw["dataset"], "train")
            need(kw["dataset"], "train", n, "n_train", exp)
            if kw["rehearsal_fraction"] > 0 and isinstance(kw["rehearsal_from"], str):
                k = formatting.rehearsal_count(n, kw["rehearsal_fraction"])
                need(kw["rehearsal_from"], "train", k, f"the rehearsal share ({kw['rehearsal_fraction']} of {n})",
                     exp)
        h = spec["measure"].get("heldout")
        for ds in (h or {}).get("datasets", []):
            need(ds, "heldout", h["n"], "heldout.n", exp)
        ls = spec["measure"].get("landscape")
        if ls:
            skip = h["n"] if h and ls.get("disjoint") and ls["dataset"] in h["datasets"] else 0
            need(ls["dataset"], "heldout", ls["n_examples"], "landscape.n_examples", exp, after=skip)


# ------------------------------------------------------------------ what this machine cannot compute
def unreachable(exp: dict, seen: dict[tuple[str, str], str | None] | None = None) -> str | None:
    """Why an experiment cannot be computed on this machine (None: it can): a training or held-out set the
    mirror lacks and the Hub cannot give here, or a base model that cannot be had (DataUnavailable,
    ModelUnavailable). A set that is here but damaged is no such reason: its experiment runs and fails,
    naming the file. ``seen`` remembers the answers across experiments (the records read stay cached)."""
    seen = {} if seen is None else seen
    for name in sorted(datasets_of(exp)):
        if ("data", name) not in seen:
            try:
                formatting.load_records(name, "train")
                seen["data", name] = None
            except sources.DataUnavailable as err:
                seen["data", name] = str(err)
        if seen["data", name]:
            return seen["data", name]
    from cfsam.evaluation import tasks

    for task in exp["measure"].get("eval", {}).get("tasks", []):
        spec = tasks.task_spec(task)
        name = spec["dataset"]
        if ("eval", name) not in seen:
            try:
                sources.load_eval(name, spec["split"])
                seen["eval", name] = None
            except sources.DataUnavailable as err:
                # a set that this source lacks by design (RACE-high in the mirror) is a missing task of the
                # entry, as it would be anywhere; one it should give but cannot here makes the entry wait
                seen["eval", name] = None if _lacked_by_design(name) else str(err)
        if seen["eval", name]:
            return seen["eval", name]
    model = runs.parse(exp["run"]).base_model()
    if isinstance(model, str) and model in models.model_names():
        if ("model", model) not in seen:
            try:
                models.load_tokenizer(model)  # the cheap part of a model: it fails the same way when it is not here
                seen["model", model] = None
            except models.DamagedModelFile:
                seen["model", model] = None  # here but damaged: an error of the run, not a reason to skip it
            except models.ModelUnavailable as err:
                seen["model", model] = str(err)
        return seen["model", model]
    return None


def _lacked_by_design(name: str) -> bool:
    """Whether the source read here (the mirror, else the Hub) lacks this set by its registry entry."""
    spec = sources.dataset_spec(name)
    return "files" not in spec if sources.use_mirror() else "id" not in spec.get("hub", {})
