"""The evaluation harness: zero/k-shot log-likelihood multiple choice on the paper's general-ability suite.

Forgetting is measured as the drop of general ability after the second fine-tuning stage, so this module
decides what every table says. For each task (``cfsam.tasks``: prompts as data, following lm-eval's
definitions) every choice is scored as the summed log-probability of its continuation given the
context, tokenised exactly as lm-evaluation-harness does (``encode_pair``); the prediction is the
argmax. Recorded per item: each choice's log-likelihood (sum, per character, token count), the
prediction and the gold answer; per task: acc, acc_norm (per character, as lm-eval), acc_tok (per
token, as OpenCompass's perplexity mode), mean gold log-prob (measurable even at chance accuracy),
item counts and standard errors. ``categories`` averages them into the paper's DK / Understanding /
Reasoning / Exams and AVG, listing the tasks that fed each and the ones that were missing.

Speed. Each context is computed once for all its choices: a context and all its continuations are
packed into one row, with an attention mask that lets every continuation see the context and itself
only, and position ids restarting after the context; so a 4-choice question costs one context plus
four short continuations, and an MMLU question (one-token answers) costs its context alone. A long
prefix shared by many contexts (a few-shot preamble, TruthfulQA's QA primer) is computed once and the
contexts continue from its KV cache. Rows are sorted by length and batched; the output head is applied
only at the positions that predict a continuation token. With ``WORLD_SIZE`` > 1 (torchrun) rows are
split across ranks and gathered.
Results are cached per task by (weights hash, tokenizer, task definition, data files, settings).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cfsam import models, tasks
from cfsam.io import write_json_atomic

log = logging.getLogger(__name__)

HARNESS_VERSION = 1  # bump when scoring changes meaning: old cache entries then stop matching
CATEGORY_ORDER = tasks.CATEGORIES


# ------------------------------------------------------------------------------- tokenisation
def prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty context (lm-eval: BOS, else EOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) strings -> token ids, as lm-eval's ``_encode_pair``.

    Trailing spaces of the context move to the continuation; the continuation's tokens are those of
    ``encode(context + continuation)`` after the first ``len(encode(context))``, so word boundaries
    tokenise as the model saw them in training. An empty context becomes the prefix token.
    """
    moved = []
    for ctx, cont in pairs:
        n = len(ctx) - len(ctx.rstrip())
        moved.append((ctx[:len(ctx) - n], ctx[len(ctx) - n:] + cont) if n else (ctx, cont))
    ctx_texts = sorted({c for c, _ in moved if c})
    ctx_ids = dict(zip(ctx_texts, tokenizer(ctx_texts)["input_ids"])) if ctx_texts else {}
    whole = tokenizer([c + k for c, k in moved if c])["input_ids"] if ctx_texts else []
    bare = [k for c, k in moved if not c]
    bare_ids = iter(tokenizer(bare, add_special_tokens=False)["input_ids"] if bare else [])
    whole_ids = iter(whole)
    prefix = prefix_token_id(tokenizer)
    out = []
    for ctx, cont in moved:
        if ctx:
            c_ids = ctx_ids[ctx]
            k_ids = next(whole_ids)[len(c_ids):]
        else:
            k_ids = next(bare_ids)
            c_ids, k_ids = ([prefix], k_ids) if not k_ids or k_ids[0] != prefix else (k_ids[:1], k_ids[1:])
        if not k_ids:
            raise ValueError(f"continuation {cont!r} after context {ctx[-40:]!r} has no tokens to score")
        out.append((list(c_ids), list(k_ids)))
    return out


# ---------------------------------------------------------------------------------- scoring
def _rank_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _head_parts(model):
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        raise ValueError(f"{type(model).__name__} rescales its logits; the harness assumes logits = lm_head(hidden)")
    if "flash" in str(getattr(cfg, "_attn_implementation", "")):
        raise ValueError("the packed scoring needs a custom attention mask: load the model with "
                         "attn_implementation='sdpa' or 'eager', not flash attention")
    return model.get_decoder(), model.get_output_embeddings()


def _forward_rows(model, rows: list[tuple[list[int], list[list[int]]]], pad_id: int, prefix=None) -> list[list]:
    """One batch of packed rows (context, continuations) -> per-token log-probs (float64) of each continuation.

    ``prefix`` = (its length, its KV cache for one sequence): the rows' contexts continue it.
    """
    decoder, head = _head_parts(model)
    device = next(model.parameters()).device
    n_pre = prefix[0] if prefix else 0
    # The last token of a continuation is only ever a target, never an input.
    width = max(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # 0 context, k+1 continuation k, -1 pad
    src_b, src_p, targets = [], [], []
    for b, (ctx, conts) in enumerate(rows):
        n = len(ctx)
        ids[b, :n], pos[b, :n], seg[b, :n] = torch.tensor(ctx), torch.arange(n_pre, n_pre + n), 0
        off = n
        for k, cont in enumerate(conts):
            m = len(cont) - 1
            ids[b, off:off + m] = torch.tensor(cont[:-1], dtype=torch.long)
            pos[b, off:off + m] = torch.arange(n_pre + n, n_pre + n + m)  # every continuation follows the context
            seg[b, off:off + m] = k + 1
            # token j of the continuation is predicted at the position holding token j-1
            src_b += [b] * (m + 1)
            src_p += [n - 1] + list(range(off, off + m))
            targets += cont
            off += m
    if not prefix and all(sum(len(c) > 1 for c in conts) <= 1 for _, conts in rows):
        # Every row is one plain sequence (context, then at most one continuation with input tokens, as with
        # one-token answers): the causal mask is enough and padding at the end is never attended to.
        hidden = decoder(input_ids=ids.to(device), use_cache=False).last_hidden_state
    else:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = causal & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0))
        cache = None
        if prefix:  # every token also sees the whole shared prefix, held in the (copied) cache
            allowed = torch.cat([torch.ones(len(rows), width, n_pre, dtype=torch.bool), allowed], dim=2)
            cache = copy.deepcopy(prefix[1])
            cache.batch_repeat_interleave(len(rows))
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                         past_key_values=cache, use_cache=cache is not None).last_hidden_state
    picked = hidden[torch.tensor(src_b, device=device), torch.tensor(src_p, device=device)]
    tgt = torch.tensor(targets, device=device)
    logp = torch.cat([head(h).float().log_softmax(-1).gather(1, t[:, None])[:, 0]
                      for h, t in zip(picked.split(1024), tgt.split(1024))])
    per_token = logp.double().cpu().split([len(c) for _, conts in rows for c in conts])
    out, i = [], 0
    for _, conts in rows:
        out.append(list(per_token[i:i + len(conts)]))
        i += len(conts)
    return out


def shared_prefixes(contexts: list[list[int]], min_len: int = 32) -> list[int]:
    """Per context, the length of a token prefix it shares with other contexts (0: none worth sharing).

    Contexts sorted by tokens are cut into runs whose common prefix is >= ``min_len`` tokens (a few-shot
    preamble, TruthfulQA's QA primer, a subject's examples); each context keeps >= 1 token of its own.
    """
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])
    out = [0] * len(contexts)
    run, common = [order[0]] if order else [], len(contexts[order[0]]) - 1 if order else 0

    def close():
        if len(run) > 1 and common >= min_len:
            for i in run:
                out[i] = common

    for prev, i in zip(order, order[1:]):
        a, b = contexts[prev], contexts[i]
        lcp = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shared = min(common, lcp, len(b) - 1)
        if shared >= min_len:
            run.append(i)
            common = shared
        else:
            close()
            run, common = [i], len(b) - 1
    close()
    return out


ROW_TOKENS = 2048  # longest packed row (context + continuations) before a new row starts


@torch.inference_mode()
def score_groups(model, groups: list[tuple[list[int], list[list[int]]]], *, pad_id: int = 0,
                 batch_size: int = 16, max_batch_tokens: int = 16384, progress: bool = False) -> list[list[float]]:
    """Summed log-prob of each continuation of each (context ids, [continuation ids]) group.

    Contexts are left-truncated to the model's length; groups too long for one row are split into
    several rows (each repeating the context); a long prefix shared by many contexts is computed once
    and continued from its KV cache. Runs data parallel when ``WORLD_SIZE`` > 1.
    """
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError(f"batch_size and max_batch_tokens must be positive, got {batch_size}, {max_batch_tokens}")
    was_training = model.training
    model.eval()
    try:
        return _score_rows(model, groups, pad_id, batch_size, max_batch_tokens, progress)
    finally:
        model.train(was_training)


def _score_rows(model, groups, pad_id: int, batch_size: int, max_batch_tokens: int,
                progress: bool) -> list[list[float]]:
    max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    contexts = []
    for ctx, conts in groups:
        longest = max(len(c) for c in conts)
        if len(ctx) + longest - 1 > max_len:  # as lm-eval: keep the last max_len + 1 tokens (>= 1 of context)
            ctx = ctx[-max(1, max_len + 1 - longest):]
        contexts.append(ctx)
    n_pre = shared_prefixes(contexts)
    # A continuation that is a token prefix of a longer one in its group (csl_dev's "abstract" vs "abstract +
    # keywords") is read off the longer one's per-token log-probs instead of being computed again.
    aliases = [prefix_aliases(conts) for _, conts in groups]
    rows, where, prefix_of = [], [], []  # where[r] = (group, its continuation indices); prefix_of[r] = key
    for g, (ctx, (_, all_conts)) in enumerate(zip(contexts, groups)):
        own = [k for k in range(len(all_conts)) if k not in aliases[g]]
        conts = [all_conts[k] for k in own]
        key = tuple(ctx[:n_pre[g]])
        ctx = ctx[n_pre[g]:]
        start, used = 0, len(ctx)
        # attention is quadratic in a row: past ROW_TOKENS, repeating the context in a new row is cheaper
        # than packing more continuations (csl_dev's 1000-token texts share one empty context)
        row_limit = min(max_batch_tokens, max(ROW_TOKENS, len(ctx) + max(len(c) for c in conts)))
        for k, cont in enumerate(conts):
            if k > start and used + len(cont) - 1 > row_limit:
                rows.append((ctx, conts[start:k]))
                where.append((g, own[start:k]))
                prefix_of.append(key)
                start, used = k, len(ctx)
            used += len(cont) - 1
        rows.append((ctx, conts[start:]))
        where.append((g, own[start:]))
        prefix_of.append(key)

    def length(r):
        return len(rows[r][0]) + sum(len(c) - 1 for c in rows[r][1])

    rank, world = _rank_world()
    # batches never mix prefixes; longest first within each: OOM shows early
    order = sorted(range(len(rows)), key=lambda r: (prefix_of[r], -length(r)))[rank::world]
    mine: dict[int, list[float]] = {}
    caches: dict[tuple, tuple] = {}
    bar = tqdm(total=len(order), desc="scoring", unit="row", disable=not progress or rank != 0)
    i = 0
    while i < len(order):
        key = prefix_of[order[i]]
        n = max(1, min(batch_size, max_batch_tokens // max(length(order[i]) + len(key), 1)))
        batch = [r for r in order[i:i + n] if prefix_of[r] == key]
        if key and key not in caches:
            caches.clear()  # prefixes come one after the other: keep only the current one
            device = next(model.parameters()).device
            cache = _head_parts(model)[0](input_ids=torch.tensor([key], device=device), use_cache=True).past_key_values
            caches[key] = (len(key), cache)
        for r, lls in zip(batch, _forward_rows(model, [rows[r] for r in batch], pad_id, caches.get(key))):
            mine[r] = lls
        bar.update(len(batch))
        i += len(batch)
    bar.close()
    if world > 1:
        import torch.distributed as dist

        parts: list[dict] = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    per_token: list[dict] = [{} for _ in groups]
    for r, (g, ks) in enumerate(where):
        per_token[g].update(zip(ks, mine[r]))
    return [[float(per_token[g][aliases[g].get(k, k)][:len(cont)].sum()) for k, cont in enumerate(conts)]
            for g, (_, conts) in enumerate(groups)]


def prefix_aliases(conts: list[list[int]]) -> dict[int, int]:
    """{k: j} for each continuation k that is a strict token prefix of a continuation j not itself aliased."""
    order = sorted(range(len(conts)), key=lambda k: -len(conts[k]))
    out: dict[int, int] = {}
    for pos, k in enumerate(order):
        j = next((j for j in order[:pos] if j not in out and len(conts[j]) > len(conts[k])
                  and conts[j][:len(conts[k])] == conts[k]), None)
        if j is not None:
            out[k] = j
    return out


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], **kwargs) -> list[tuple[float, int]]:
    """(context, continuation) strings -> (summed log-prob, continuation token count), shared contexts once."""
    encoded = encode_pairs(tokenizer, pairs)
    index: dict[tuple, int] = {}
    groups: list[tuple[list[int], list[list[int]]]] = []
    slot = []
    for ctx, cont in encoded:
        g = index.setdefault(tuple(ctx), len(groups))
        if g == len(groups):
            groups.append((ctx, []))
        slot.append((g, len(groups[g][1])))
        groups[g][1].append(cont)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_groups(model, groups, pad_id=pad, **kwargs)
    return [(scores[g][k], len(groups[g][1][k])) for g, k in slot]


# ---------------------------------------------------------------------------------- metrics
def _mean_se(values) -> tuple[float, float | None]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None


def score_item(item: tasks.Item, lls: list[float], n_tokens: list[int], primary: str) -> dict:
    """Per-item record: log-likelihoods, the prediction by the task's primary metric, the gold answer."""
    ll = np.asarray(lls)
    norm = ll / np.maximum([len(c) for c in item.choices], 1)   # lm-eval's acc_norm: per character
    tok = ll / np.asarray(n_tokens)                              # OpenCompass's perplexity: per token
    golds = item.gold if isinstance(item.gold, list) else [item.gold]
    p = np.exp(ll - ll.max())
    rec = {"idx": item.idx, "ll": ll.tolist(), "ll_norm": norm.tolist(), "n_tokens": list(n_tokens),
           "gold": item.gold, "group": item.group,
           "acc": float(int(ll.argmax()) in golds), "acc_norm": float(int(norm.argmax()) in golds),
           "acc_tok": float(int(tok.argmax()) in golds),
           "gold_logprob": float(ll[golds[0]]),
           # log-prob of the gold among the choices: moves even when the argmax does not
           "gold_choice_logprob": float(ll[golds[0]] - (ll.max() + np.log(p.sum())))}
    if primary == "mc2":
        rec["mc2"] = float(p[golds].sum() / p.sum())
    rec["pred"] = int({"acc_norm": norm, "acc_tok": tok}.get(primary, ll).argmax())
    return rec


METRICS = ("acc", "acc_norm", "acc_tok", "gold_logprob", "gold_choice_logprob", "mc2")


def aggregate_groups(group_scores: dict[str, float], group_categories: dict[str, list[str]]) -> tuple[float, dict]:
    """Unweighted mean over groups (MMLU subjects) and over the groups of each category."""
    cats = {}
    for cat, members in group_categories.items():
        vals = [group_scores[g] for g in members if g in group_scores]
        cats[cat] = float(np.mean(vals)) if vals else None
    return float(np.mean(list(group_scores.values()))), cats


def task_result(name: str, records: list[dict], n_total: int) -> dict:
    """Per-task metrics from per-item records."""
    spec = tasks.task_spec(name)
    primary = spec.get("primary", "acc")
    res = {"status": "ok", "task": name, "paper": spec.get("paper"), "category": spec["category"],
           "variant": tasks.variant(name), "lm_eval": spec.get("lm_eval"), "primary": primary,
           "n": len(records), "n_total": n_total}
    for m in METRICS:
        if m in records[0]:
            res[m], res[m + "_stderr"] = _mean_se([r[m] for r in records])
    res["score"], res["score_stderr"] = res[primary], res[primary + "_stderr"]
    if spec.get("aggregate") == "macro":
        by_group: dict[str, list[float]] = {}
        for r in records:
            by_group.setdefault(r["group"], []).append(r[primary])
        groups = {g: {"n": len(v), "score": float(np.mean(v)), "stderr": _mean_se(v)[1]}
                  for g, v in sorted(by_group.items())}
        res["score"], res["subcategories"] = aggregate_groups({g: v["score"] for g, v in groups.items()},
                                                               spec.get("group_categories", {}))
        # the macro mean's stderr from the groups' (independent); groups of one item contribute none
        se = [v["stderr"] for v in groups.values() if v["stderr"] is not None]
        res["score_stderr"] = float(math.sqrt(sum(x * x for x in se)) / len(groups)) if se else None
        res["groups"] = groups
    res["records"] = records
    return res


def categories(results: dict) -> dict:
    """The paper's four categories (unweighted means of their tasks' scores), AVG, and MMLU's categories.

    Every category lists the tasks that fed it and, with the reason, those that did not (missing data
    or not evaluated); ``complete`` is False when any was missing.
    """
    res_tasks = results.get("tasks", {})
    out: dict[str, dict] = {}
    for cat, names in tasks.paper_tasks().items():
        used = {n: res_tasks[n]["score"] for n in names if res_tasks.get(n, {}).get("status") == "ok"}
        missing = {n: res_tasks[n].get("reason", "missing") if n in res_tasks else "not evaluated"
                   for n in names if n not in used}
        out[cat] = {"score": float(np.mean(list(used.values()))) if used else None, "tasks": used,
                    "missing": missing, "complete": not missing,
                    "variants": {n: res_tasks[n]["variant"] for n in used if res_tasks[n].get("variant")}}
    have = {c: out[c]["score"] for c in CATEGORY_ORDER if out[c]["score"] is not None}
    out["AVG"] = {"score": float(np.mean(list(have.values()))) if have else None, "categories": have,
                  "missing": [c for c in CATEGORY_ORDER if c not in have],
                  "complete": all(out[c]["complete"] for c in CATEGORY_ORDER)}
    if res_tasks.get("mmlu", {}).get("status") == "ok":
        out["MMLU"] = dict(res_tasks["mmlu"]["subcategories"])
    return out


# ------------------------------------------------------------------------------------ cache
def _tokenizer_id(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return f"{type(tokenizer).__name__}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def cache_key(weights: str, tokenizer_id: str, name: str, settings: dict) -> str:
    spec = tasks.task_spec(name)
    blob = json.dumps({"harness": HARNESS_VERSION, "weights": weights, "tokenizer": tokenizer_id, "task": name,
                       "definition": spec["_source"], "data": tasks.data_hashes(name), **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------- evaluate
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
             num_fewshot: int = 0, batch_size: int = 16, max_batch_tokens: int = 16384,
             cache_dir: str | Path | None = None, use_cache: bool = True, progress: bool = True,
             device: str | torch.device | None = None) -> dict:
    """Evaluate a model on tasks by name ('paper' and 'all' expand); returns a JSON-able dict.

    ``limit`` takes a seeded subsample of that many items per task. Results are cached per task under
    ``cache_dir`` (default ``$CFSAM_CACHE/eval``) unless ``use_cache`` is False. The model runs on
    ``device`` if given, else on CUDA (this rank's) when there is one, else where it is.
    """
    names = tasks.check_names([task_list] if isinstance(task_list, str) else list(task_list))
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items or None, got {limit}")
    loaded = _as_loaded(model_or_loaded)
    model, tok = loaded.model, loaded.tokenizer
    if device is not None:
        model.to(device)
    elif torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    rank, _ = _rank_world()
    settings = {"limit": limit, "seed": seed, "num_fewshot": num_fewshot}
    weights, tok_id = models.weights_hash(model), _tokenizer_id(tok)
    cache = Path(cache_dir) if cache_dir else models.cache_dir() / "eval"
    results = {"model": {"name": loaded.name, "source": loaded.source, "weights_hash": weights},
               "settings": settings, "harness_version": HARNESS_VERSION, "tasks": {}}
    todo: dict[str, tuple[list[tasks.Item], int, str]] = {}
    for name in names:
        try:
            items, n_total = tasks.load_items(name, limit=limit, seed=seed, num_fewshot=num_fewshot)
        except tasks.TaskMissing as err:
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


# -------------------------------------------------------------------------------------- CLI
def summary_tables(results: dict):
    """Two pandas tables (percent): tasks, and the paper's categories with MMLU's."""
    import pandas as pd

    rows = []
    for name, r in results["tasks"].items():
        if r["status"] != "ok":
            rows.append({"task": name, "category": r["category"], "status": "MISSING: " + r["reason"]})
            continue
        rows.append({"task": name, "category": r["category"], "n": r["n"], "metric": r["primary"],
                     "score": 100 * r["score"], "±": math.nan if r["score_stderr"] is None else 100 * r["score_stderr"], "acc": 100 * r["acc"],
                     "acc_norm": 100 * r["acc_norm"], "gold_logprob": r["gold_logprob"],
                     "status": "variant: " + r["variant"] if r.get("variant") else "ok"})
    task_df = pd.DataFrame(rows)
    if "n" in task_df:
        task_df["n"] = task_df["n"].astype("Int64")
    cats = results.get("categories") or categories(results)
    crows = [{"category": c, "score": None if cats[c]["score"] is None else 100 * cats[c]["score"],
              "tasks": ", ".join(cats[c]["tasks"]), "missing": ", ".join(cats[c]["missing"])} for c in CATEGORY_ORDER]
    crows.append({"category": "AVG", "score": None if cats["AVG"]["score"] is None else 100 * cats["AVG"]["score"],
                  "tasks": ", ".join(cats["AVG"]["categories"]), "missing": ", ".join(cats["AVG"]["missing"])})
    for sub, v in cats.get("MMLU", {}).items():
        crows.append({"category": f"MMLU {sub}", "score": None if v is None else 100 * v, "tasks": "mmlu",
                      "missing": ""})
    return task_df, pd.DataFrame(crows)


def cmd_eval(args) -> int:
    import pandas as pd

    names = tasks.check_names([t.strip() for t in args.tasks.split(",") if t.strip()])  # fail before loading
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    loaded = models.load_model(args.model, dtype=dtype)
    results = evaluate(loaded, names, limit=args.limit, seed=args.seed, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=True,
                       device=args.device)
    rank, _ = _rank_world()
    if rank != 0:
        return 0
    if args.out:
        write_json_atomic(args.out, results)
    task_df, cat_df = summary_tables(results)
    with pd.option_context("display.max_colwidth", 60, "display.width", 200, "display.float_format", "{:.2f}".format):
        print(task_df.to_string(index=False))
        print()
        print(cat_df.to_string(index=False))
    t = results["timing"]
    if t["items"]:
        print(f"\n{t['items']} items in {t['seconds']:.1f} s ({t['items_per_s']:.1f} items/s)")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on the paper's general-ability tasks")
    p.add_argument("--model", required=True, help="model preset or saved model directory")
    p.add_argument("--tasks", default="paper",
                   help="comma-separated task names, or 'paper' (the 13 of the paper's 4 categories) or 'all'; "
                        f"tasks: {', '.join(tasks.task_names())}")
    p.add_argument("--limit", type=int, default=None, help="seeded subsample of N items per task")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: the model's, or CUDA if present)")
    p.add_argument("--cache-dir", default=None, help="per-task result cache (default: $CFSAM_CACHE/eval)")
    p.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
    p.add_argument("--out", default=None, help="write the full results (per-item records included) as JSON")
    p.set_defaults(func=cmd_eval)
