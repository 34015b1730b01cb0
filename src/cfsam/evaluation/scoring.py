"""Log-likelihood scoring of (context, continuation) pairs: shared prefixes, packed rows, one forward per row."""
from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from cfsam.core.dist import rank_world
from cfsam.core.errors import UsageError


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
            raise UsageError(f"continuation {cont!r} after context {ctx[-40:]!r} has no tokens to score")
        out.append((list(c_ids), list(k_ids)))
    return out


def _head_parts(model):
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        raise UsageError(f"{type(model).__name__} rescales its logits; the harness assumes logits = lm_head(hidden)")
    if "flash" in str(getattr(cfg, "_attn_implementation", "")):
        raise UsageError("the packed scoring needs a custom attention mask: load the model with "
                         "attn_implementation='sdpa' or 'eager', not flash attention")
    return model.get_decoder(), model.get_output_embeddings()


def _sliding_window(model) -> int | None:
    """The window of the model's sliding-window layers (Gemma 3: 5 of every 6), or None if it has none."""
    cfg = model.config
    return cfg.sliding_window if "sliding_attention" in (getattr(cfg, "layer_types", None) or []) else None


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

        def additive(ok):
            return torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, torch.finfo(dtype).min)[:, None].to(device)

        mask = additive(allowed)
        window = _sliding_window(model)
        if window:  # a custom mask replaces the model's own, window included: sliding layers get theirs by position
            keys = torch.cat([torch.arange(n_pre).expand(len(rows), n_pre), pos], dim=1) if prefix else pos
            mask = {"full_attention": mask,
                    "sliding_attention": additive(allowed & (pos[:, :, None] - keys[:, None, :] < window))}
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device),
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
        raise UsageError(f"batch_size and max_batch_tokens must be positive, got {batch_size}, {max_batch_tokens}")
    was_training = model.training
    model.eval()
    try:
        return _score_rows(model, groups, pad_id, batch_size, max_batch_tokens, progress)
    finally:
        model.train(was_training)


def plan_rows(groups, max_len: int, max_batch_tokens: int) -> tuple[list, list, list]:
    """How ``score_groups`` packs groups into rows: (rows of (context after its shared prefix, continuations),
    where[r] = (group, its continuation indices), prefix_of[r] = the shared prefix a row continues)."""
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
    return rows, where, prefix_of


def forward_tokens(rows, prefix_of) -> int:
    """Tokens a plan runs through the model: every row (context + continuations but their last tokens) and
    every shared prefix once. At the model's forward rate this is the floor of the scoring time."""
    return sum(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in rows) + sum(len(k) for k in set(prefix_of))


def head_positions(rows) -> int:
    """Positions a plan runs through the head: one per continuation token (the rest of a row is context)."""
    return sum(len(c) for _, conts in rows for c in conts)


def _score_rows(model, groups, pad_id: int, batch_size: int, max_batch_tokens: int,
                progress: bool) -> list[list[float]]:
    max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    rows, where, prefix_of = plan_rows(groups, max_len, max_batch_tokens)
    aliases = [prefix_aliases(conts) for _, conts in groups]  # as plan_rows: read off their longer continuation

    def length(r):
        return len(rows[r][0]) + sum(len(c) - 1 for c in rows[r][1])

    rank, world = rank_world()
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
            from transformers import DynamicCache

            caches.clear()  # prefixes come one after the other: keep only the current one
            device = next(model.parameters()).device
            # a plain DynamicCache keeps every prefix token in every layer; the model's own would keep only the
            # last window of its sliding layers, which the rows' masks (by position) could not address
            cache = _head_parts(model)[0](input_ids=torch.tensor([key], device=device), use_cache=True,
                                          past_key_values=DynamicCache()).past_key_values
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


def group_pairs(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list, list[tuple[int, int]]]:
    """Encoded pairs grouped by context: ([(context ids, [continuation ids])], slot of each pair)."""
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
    return groups, slot


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], **kwargs) -> list[tuple[float, int]]:
    """(context, continuation) strings -> (summed log-prob, continuation token count), shared contexts once."""
    groups, slot = group_pairs(tokenizer, pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_groups(model, groups, pad_id=pad, **kwargs)
    return [(scores[g][k], len(groups[g][1][k])) for g, k in slot]
