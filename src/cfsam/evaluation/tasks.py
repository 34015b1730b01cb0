"""Evaluation tasks as data: ``registry/tasks/<name>.yaml`` -> multiple-choice items.

Each task file names a set of the data registry (``cfsam.data``: mirror files, or the set's Hugging Face
Hub copy rewritten into the mirror's record schema; read with ``datasets``) and says, like an
lm-evaluation-harness task config, how one record becomes one item:

* ``text``      Jinja template of the prompt (the context);  ``preamble`` goes before few-shot examples
* ``choices``   Jinja expression -> the list of answer strings, scored as continuations of the context
* ``gold``      Jinja expression -> the index of the right choice (or a list of indices: TruthfulQA MC2)
* ``contexts`` + ``continuation``: the other shape (WinoGrande): one context per choice, a shared
  continuation
* ``target_delimiter`` (default " ") joins context and continuation; ``filter`` keeps some records;
  ``group`` (an expression) labels records (MMLU subjects); ``sample: stratified`` draws a ``limit``
  subsample evenly over the groups (each subject counts alike in a macro mean); ``fewshot`` says where
  examples come from
* ``category`` (the paper's DK / Understanding / Reasoning / Exams, or ``extra``), ``paper`` and
  ``order`` (its column name and place in the paper's tables), ``primary`` (the metric its category
  average uses: acc, acc_norm, acc_tok or mc2), ``variant`` (how this differs from the paper's set),
  ``lm_eval`` (the lm-eval task whose definition the prompt follows, or null)

Prompts follow lm-eval's definitions wherever lm-eval has the task, so that per-item agreement with it
is a meaningful check (``benchmarks/bench_eval.py``). A task whose data cannot be had here (the mirror
lacks the set, as the data registry and the mirror's MANIFEST.md say, or the Hub cannot be reached) raises
``TaskMissing``: the harness reports it as missing instead of leaving it out. Data that is there but cannot
be read (a truncated or malformed file, a record that does not fit the task) raises ``sources.DataError``
(``DamagedFile`` for a mirror file) naming the file: a score must never quietly lose a task to it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from cfsam.core import registry
from cfsam.core.errors import RunFailed, UnknownName, UsageError
from cfsam.data import sources

TASK_DIR = Path(__file__).parent.parent / "registry" / "tasks"
CATEGORIES = ("DK", "Understanding", "Reasoning", "Exams")
PRIMARY_METRICS = ("acc", "acc_norm", "acc_tok", "mc2")
FEWSHOT_DELIMITER = "\n\n"  # between few-shot examples, as lm-eval


class TaskMissing(RunFailed):
    """The task is defined but its data set is not available here (the message says why): never raised for a
    damaged file, which is a ``sources.DataError`` naming it."""


@dataclass
class Item:
    """One multiple-choice question, ready to score: choice i is ``contexts[i] + continuations[i]``."""

    idx: int                   # position in the task's (filtered) record list: lm-eval's doc id too
    contexts: list[str]
    continuations: list[str]
    choices: list[str]         # the answer strings (lm-eval's acc_norm divides by their length)
    gold: int | list[int]
    group: str | None = None   # e.g. the MMLU subject


# ------------------------------------------------------------------------------------ templates
def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: brackets are artifacts of the WikiHow part of HellaSwag
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_ctx(line: str) -> str:
    # llama.cpp's line is "activity_label: ctx_a ctx_b"; lm-eval capitalises ctx_b (the sentence start
    # after ctx_a's last full stop) before cleaning. A lower-case trailing fragment can only be ctx_b.
    head, sep, tail = line.rpartition(". ")
    if sep and tail[:1].islower():
        line = head + sep + tail.capitalize()
    return _hellaswag_clean(line)


def _true_indices(values) -> list[int]:
    return [i for i, v in enumerate(values) if v]


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters.update(hellaswag_clean=_hellaswag_clean, hellaswag_ctx=_hellaswag_ctx,
                       select_true_indices=_true_indices)
    return env


# ------------------------------------------------------------------------------------- registry
@lru_cache(maxsize=1)
def _registry() -> dict[str, dict]:
    return registry.entries("tasks")


def task_names(category: str | None = None) -> list[str]:
    """All task names, or those of one paper category (DK, Understanding, Reasoning, Exams, extra)."""
    return [n for n, s in _registry().items() if category is None or s["category"] == category]


def paper_tasks() -> dict[str, list[str]]:
    """The paper's four categories and their tasks, in the paper's column order."""
    return {c: sorted(task_names(c), key=lambda n: task_spec(n).get("order", 0)) for c in CATEGORIES}


def task_spec(name: str) -> dict:
    reg = _registry()
    if name not in reg:
        raise UnknownName(f"unknown task {name!r}; allowed: {', '.join(reg)}")
    return reg[name]


def check_names(names: list[str]) -> list[str]:
    """Validate task names before any work; 'paper' and 'all' expand to their task lists."""
    out: list[str] = []
    for name in names:
        if name == "paper":
            out += [t for names_ in paper_tasks().values() for t in names_]
        elif name == "all":
            out += task_names()
        else:
            task_spec(name)
            out.append(name)
    return list(dict.fromkeys(out))  # de-duplicate, keep order


def variant(name: str) -> str | None:
    """How the evaluated set differs from the paper's (task and data-registry labels), or None."""
    spec = task_spec(name)
    labels = [spec.get("variant")]
    try:
        labels.append(sources.label(spec["dataset"]))
    except sources.DataError:
        pass
    labels = [x for x in dict.fromkeys(labels) if x]
    return "; ".join(labels) or None


def data_hashes(name: str) -> dict[str, str]:
    """What a task reads (part of the eval cache key): sha256 of its mirror files, or its Hub id, config,
    splits and revision."""
    spec = task_spec(name)
    splits = [spec["split"]]
    if spec.get("fewshot", {}).get("split") not in (None, spec["split"]):
        splits.append(spec["fewshot"]["split"])
    return sources.file_hashes(spec["dataset"], splits)


def _records(spec: dict, split: str) -> list[dict]:
    try:
        records = sources.load_eval(spec["dataset"], split)
    except sources.DataUnavailable as err:
        raise TaskMissing(f"task {spec['task']!r}: {err}") from err
    except sources.DataError as err:  # damaged, malformed or absent from a mirror that should hold it
        raise type(err)(f"task {spec['task']!r}: {err}") from err
    keep = _env().compile_expression(spec["filter"]) if spec.get("filter") else None
    group = _env().compile_expression(spec["group"]) if spec.get("group") else None
    out = []
    for i, r in enumerate(records):
        try:
            if keep is not None and not keep(**r):
                continue
            if group is not None:
                r["group"] = group(**r)
        except _RECORD_ERRORS as err:
            raise _bad_record(spec, split, i, err) from err
        out.append(r)
    return out


# what a template raises on a record without the task's fields (StrictUndefined) or with odd values
_RECORD_ERRORS = (jinja2.TemplateError, TypeError, KeyError, IndexError, ValueError, AttributeError)


def _bad_record(spec: dict, split: str, i: int, err: Exception, what: str = "record") -> sources.DataError:
    """A record the task cannot read: an error naming the files (or Hub copy) it came from."""
    dataset, mirror = spec["dataset"], sources.use_mirror()
    try:
        where = ", ".join(map(str, sources.raw_files(dataset, split))) if mirror else \
            "hub:" + sources._hub().hub_ref(dataset, split)
    except sources.DataError:
        where = f"dataset {dataset!r}, split {split!r}"
    fix = ("the file may be damaged: restore it from a good copy of the mirror (MANIFEST.md names its source)"
           if mirror else "the Hub copy may have changed: pin hub.revision in the data registry or use a mirror")
    cls = sources.DamagedFile if mirror else sources.DataError
    return cls(f"task {spec['task']!r}: {what} {i} of {where} does not fit the task ({type(err).__name__}: "
               f"{str(err)[:200]}); {fix}")


class _Renderer:
    """A task's compiled templates: record -> (prompt text, choices, gold, contexts, continuation)."""

    def __init__(self, spec: dict):
        env = _env()
        self.spec = spec
        self.preamble = env.from_string(spec.get("preamble", ""))
        self.delim = spec.get("target_delimiter", " ")
        if "contexts" in spec:
            self.contexts = env.compile_expression(spec["contexts"])
            self.continuation = env.from_string(spec["continuation"])
        else:
            self.text = env.from_string(spec.get("text", ""))
            self.choices = env.compile_expression(spec["choices"])
        self.gold = env.compile_expression(spec["gold"])

    def shot(self, r: dict) -> str:
        """A solved example for a few-shot prompt: the prompt and its gold answer."""
        gold = self.gold(**r)
        gold = gold[0] if isinstance(gold, list) else gold
        if "contexts" in self.spec:
            return self.contexts(**r)[gold] + self.delim + self.continuation.render(**r)
        return self.text.render(**r) + self.delim + self.choices(**r)[gold]

    def item(self, idx: int, r: dict, shots: list[dict]) -> Item:
        prefix = self.preamble.render(**r)
        if shots:
            prefix += FEWSHOT_DELIMITER.join(self.shot(s) for s in shots) + FEWSHOT_DELIMITER
        gold = self.gold(**r)
        gold = [int(g) for g in gold] if isinstance(gold, list) else int(gold)
        if "contexts" in self.spec:
            choices = [str(c) for c in self.contexts(**r)]
            cont = self.delim + self.continuation.render(**r)
            return Item(idx, [prefix + c for c in choices], [cont] * len(choices), choices, gold, r.get("group"))
        choices = [str(c) for c in self.choices(**r)]
        ctx = prefix + self.text.render(**r)
        return Item(idx, [ctx] * len(choices), [self.delim + c for c in choices], choices, gold, r.get("group"))


def subsample(n: int, limit: int | None, seed: int, name: str) -> list[int]:
    """Deterministic seeded subsample of range(n) (sorted), or all of it."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise UsageError(f"limit must be a positive number of items, got {limit}")
    return sorted(random.Random(f"{seed}:{name}").sample(range(n), limit))


def stratified_subsample(groups: list[str], limit: int | None, seed: int, name: str) -> list[int]:
    """Deterministic seeded subsample of ``limit`` indices of ``groups`` (sorted), spread as evenly as the
    groups allow: every group gets ``limit // n_groups`` (or all it has), a seeded choice of groups one more,
    and what small groups cannot take goes to the others the same way."""
    n = len(groups)
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise UsageError(f"limit must be a positive number of items, got {limit}")
    rng = random.Random(f"{seed}:{name}:stratified")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = sorted(members)
    rng.shuffle(order)  # which groups get the remainder
    take, left = dict.fromkeys(order, 0), limit
    while left:
        open_ = [g for g in order if take[g] < len(members[g])]
        share = max(left // len(open_), 1)
        for g in open_:
            extra = min(share, len(members[g]) - take[g], left)
            take[g] += extra
            left -= extra
            if not left:
                break
    return sorted(i for g in order for i in rng.sample(members[g], take[g]))


def sampling(name: str) -> str:
    """How ``limit`` items of the task are drawn: "random" or "stratified" (by its ``group``)."""
    spec = task_spec(name)
    how = spec.get("sample", "random")
    if how not in ("random", "stratified") or (how == "stratified" and not spec.get("group")):
        raise UsageError(f"task {name!r}: sample {how!r} is not allowed; use 'random', or 'stratified' with a "
                         "'group' expression")
    return how


def load_items(name: str, *, limit: int | None = None, seed: int = 1234,
               num_fewshot: int = 0, stratify: bool = True) -> tuple[list[Item], int]:
    """The task's items (a seeded subsample of ``limit`` when given: by group where the task says
    ``sample: stratified`` and ``stratify`` holds) and the full item count."""
    spec = task_spec(name)
    if num_fewshot < 0:
        raise UsageError(f"num_fewshot must be >= 0, got {num_fewshot}")
    records = _records(spec, spec["split"])
    render = _Renderer(spec)
    chosen = (stratified_subsample([r["group"] for r in records], limit, seed, name)
              if stratify and sampling(name) == "stratified" else subsample(len(records), limit, seed, name))
    pool, fs = records, spec.get("fewshot", {})
    if num_fewshot and fs.get("split"):
        pool = _records(spec, fs["split"])
    items = []
    for i in chosen:
        shots = _shots(records[i], pool, num_fewshot, fs, seed, i, same_pool=pool is records) if num_fewshot else []
        try:
            items.append(render.item(i, records[i], shots))
        except _RECORD_ERRORS as err:
            raise _bad_record(spec, spec["split"], i, err, "item") from err  # i counts filtered records
    return items, len(records)


def _shots(r: dict, pool: list[dict], k: int, fs: dict, seed: int, i: int, same_pool: bool) -> list[dict]:
    candidates = [p for j, p in enumerate(pool) if not (same_pool and j == i)
                  and (not fs.get("same_group") or p.get("group") == r.get("group"))]
    if len(candidates) < k:
        raise UsageError(f"num_fewshot={k} but only {len(candidates)} few-shot examples are available")
    if fs.get("sampler", "random") == "first_n":
        return candidates[:k]
    return random.Random(f"{seed}:{i}").sample(candidates, k)
