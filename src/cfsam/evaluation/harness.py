"""The eval harness: a model and a task list -> per-task results with per-item records, cached by weights."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from cfsam.core.dist import local_device, rank_world
from cfsam.core.errors import UsageError
from cfsam.core.io import write_json_atomic
from cfsam.data import models
from cfsam.evaluation import tasks
from cfsam.evaluation.metrics import categories, score_item, task_result
from cfsam.evaluation.scoring import loglikelihoods

log = logging.getLogger(__name__)


HARNESS_VERSION = 1  # bump when scoring changes meaning: old cache entries then stop matching


def _tokenizer_id(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return f"{type(tokenizer).__name__}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def cache_key(weights: str, tokenizer_id: str, name: str, settings: dict) -> str:
    spec = tasks.task_spec(name)
    blob = json.dumps({"harness": HARNESS_VERSION, "weights": weights, "tokenizer": tokenizer_id, "task": name,
                       "definition": yaml.safe_dump(spec, sort_keys=True), "data": tasks.data_hashes(name), **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _as_loaded(model_or_loaded) -> models.Loaded:
    if isinstance(model_or_loaded, models.Loaded):
        return model_or_loaded
    if isinstance(model_or_loaded, (str, Path)):
        return models.load_model(str(model_or_loaded))
    if isinstance(model_or_loaded, tuple) and len(model_or_loaded) == 2:
        model, tok = model_or_loaded
        return models.Loaded(model, tok, type(model).__name__, "in memory")
    raise TypeError(f"expected a models.Loaded, a preset name or directory, or (model, tokenizer); "
                    f"got {type(model_or_loaded).__name__}")


def evaluate(model_or_loaded, task_list: list[str] | str, *, limit: int | None = None, seed: int = 1234,
             num_fewshot: int = 0, stratify: bool = True, batch_size: int = 16, max_batch_tokens: int = 16384,
             cache_dir: str | Path | None = None, use_cache: bool = True, progress: bool = True,
             device: str | torch.device | None = None) -> dict:
    """Evaluate a model on tasks by name ('paper' and 'all' expand); returns a JSON-able dict.

    ``limit`` takes a seeded subsample of that many items per task (by group where the task says
    ``sample: stratified``, unless ``stratify`` is False). Results are cached per task under
    ``cache_dir`` (default ``$CFSAM_CACHE/eval``) unless ``use_cache`` is False. The model runs on
    ``device`` if given, else on CUDA (this rank's) when there is one, else where it is.
    """
    names = tasks.check_names([task_list] if isinstance(task_list, str) else list(task_list))
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be a positive number of items or None, got {limit}")
    loaded = _as_loaded(model_or_loaded)
    model, tok = loaded.model, loaded.tokenizer
    if device is not None:
        model.to(device)
    elif next(model.parameters()).device.type == "cpu":
        model.to(local_device())
    rank, _ = rank_world()
    settings = {"limit": limit, "seed": seed, "num_fewshot": num_fewshot, **({} if stratify else {"stratify": False})}
    weights, tok_id = models.weights_hash(model), _tokenizer_id(tok)
    cache = Path(cache_dir) if cache_dir else models.cache_dir() / "eval"
    results = {"model": {"name": loaded.name, "source": loaded.source, "weights_hash": weights},
               "settings": settings, "harness_version": HARNESS_VERSION, "tasks": {}}
    todo: dict[str, tuple[list[tasks.Item], int, str]] = {}
    for name in names:
        try:
            items, n_total = tasks.load_items(name, limit=limit, seed=seed, num_fewshot=num_fewshot, stratify=stratify)
        except tasks.TaskMissing as err:  # only a set not had here; a damaged file raises DataError, naming it
            log.warning("%s: missing (%s)", name, err)
            results["tasks"][name] = {"status": "missing", "task": name, "reason": str(err),
                                      "category": tasks.task_spec(name)["category"]}
            continue
        key = cache_key(weights, tok_id, name, settings)
        path = cache / f"{name}-{key}.json"
        if use_cache and path.exists():
            results["tasks"][name] = json.loads(path.read_text())
            log.info("%s: from cache %s", name, path)
            continue
        todo[name] = (items, n_total, key)

    start, cpu_start = time.perf_counter(), time.process_time()
    pairs, owners = [], []
    for name, (items, _, _) in todo.items():
        for j, item in enumerate(items):
            for ctx, cont in zip(item.contexts, item.continuations):
                pairs.append((ctx, cont))
                owners.append((name, j))
    if pairs:
        log.info("scoring %d items (%d choices) of %s", sum(len(v[0]) for v in todo.values()), len(pairs),
                 ", ".join(todo))
        scored = loglikelihoods(model, tok, pairs, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                progress=progress)
        per_item: dict[tuple[str, int], list[tuple[float, int]]] = {}
        for owner, s in zip(owners, scored):
            per_item.setdefault(owner, []).append(s)
        for name, (items, n_total, key) in todo.items():
            primary = tasks.task_spec(name).get("primary", "acc")
            records = [score_item(it, [s[0] for s in per_item[(name, j)]], [s[1] for s in per_item[(name, j)]],
                                  primary) for j, it in enumerate(items)]
            res = task_result(name, records, n_total)
            res["cache_key"] = key
            res["data"] = tasks.data_hashes(name)
            results["tasks"][name] = res
            if use_cache and rank == 0:
                write_json_atomic(cache / f"{name}-{key}.json", res)
    # request building, tokenising and scoring (not data loading); CPU time too: the machine may be shared
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    n_items = sum(len(v[0]) for v in todo.values())
    results["timing"] = {"seconds": seconds, "cpu_seconds": cpu, "items": n_items,
                         "items_per_s": n_items / seconds if n_items else None}
    results["tasks"] = {n: results["tasks"][n] for n in names}  # in the order asked for
    results["categories"] = categories(results)
    return results
