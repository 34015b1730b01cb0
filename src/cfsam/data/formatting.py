"""Training examples: the Alpaca prompt, response-only labels, the held-out split, rehearsal mixing, collation."""
from __future__ import annotations

from functools import lru_cache

import datasets
import torch

from cfsam.core.errors import UsageError
from cfsam.data.hub import load_hub
from cfsam.data.sources import (
    HELDOUT_FRACTION,
    HELDOUT_MAX,
    DataError,
    data_dir,
    dataset_names,
    dataset_spec,
    load_raw,
    use_mirror,
)

IGNORE = -100


PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


NEXT_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def _to_turns(spec: dict, record: dict) -> list[dict]:
    fields = spec["fields"]
    if "conversations" in fields:
        turns, prompt = [], None
        for msg in record[fields["conversations"]] or []:
            who = msg.get("from")
            if who in ("human", "user"):
                # the first turn opens the Alpaca template; segments() continues it for later turns
                prompt = msg["value"] if turns else PROMPT_NO_INPUT.format(instruction=msg["value"])
            elif who in ("gpt", "chatgpt", "assistant") and prompt is not None:
                turns.append({"prompt": prompt, "response": msg["value"]})
                prompt = None
        return turns

    def get(key):
        src = fields.get(key)
        if src is None:
            return ""
        return src[1:] if src.startswith("@") else (record.get(src) or "")  # "@text" is a literal

    return [{"prompt": PROMPT_INPUT.format(instruction=get("instruction"), input=get("input"))
             if get("input").strip() else PROMPT_NO_INPUT.format(instruction=get("instruction")),
             "response": get("output")}]


def load_records(name: str, split: str = "train") -> datasets.Dataset:
    """A training set as ``{"id", "turns"}`` records; split is train, heldout (fixed 5%, at most 500) or all."""
    if split not in ("train", "heldout", "all"):
        raise DataError(f"split {split!r}; allowed: train, heldout, all")
    return _load_records(name, split, str(data_dir()), use_mirror())


@lru_cache(maxsize=32)  # keyed by the mirror too: tests and users may point CFSAM_DATA_DIR elsewhere
def _load_records(name: str, split: str, _data_dir: str, _mirror: bool) -> datasets.Dataset:
    spec = dataset_spec(name)
    if spec["kind"] != "train":
        raise DataError(f"dataset {name!r} is an evaluation set; training sets: {', '.join(dataset_names('train'))}")
    if use_mirror() and "substitute" in spec:
        parts = [load_records(s, "all") for s in spec["substitute"]["sets"]]
        ds = datasets.concatenate_datasets(parts)
    elif use_mirror():
        ds = _records_from(spec, load_raw(name, "train"), name)
    else:
        ds = _records_from(spec, load_hub(name, "train"), name)  # offline: DataUnavailable, not a traceback
    if split == "all":
        return ds
    n_held = min(HELDOUT_MAX, max(1, int(HELDOUT_FRACTION * len(ds))))
    parts = ds.train_test_split(test_size=n_held, seed=0, shuffle=True)
    return parts["test" if split == "heldout" else "train"]


def _records_from(spec: dict, raw: datasets.Dataset, name: str) -> datasets.Dataset:
    if spec.get("dedupe"):
        seen, keep = set(), []
        for i, v in enumerate(raw[spec["dedupe"]]):
            if v not in seen:
                seen.add(v)
                keep.append(i)
        raw = raw.select(keep)
    ds = raw.map(lambda r, i: {"id": f"{name}-{i}", "turns": _to_turns(spec, r)}, with_indices=True,
                 remove_columns=raw.column_names)
    return ds.filter(lambda r: len(r["turns"]) > 0 and all(t["response"].strip() for t in r["turns"]))


def segments(turns: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of a record in the Alpaca template; later turns continue it."""
    out = []
    for k, t in enumerate(turns):
        out.append((t["prompt"] if k == 0 else NEXT_TURN.format(instruction=t["prompt"]), False))
        out.append((t["response"], True))
    return out


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts a text with BOS (Gemma's ``<bos>``; SmolLM2's does not).

    Asked of the tokenizer's output, not of its ``add_bos_token`` attribute: transformers 5's Gemma
    tokenizer reports False there yet prepends ``<bos>`` (its post-processor), and Gemma without it
    degenerates ("The capital of France is France. The The The ..."). The evaluation's contexts are
    encoded with the special tokens, so training and scoring then see the same start."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def tokenize(turns: list[dict], tokenizer, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (-100 on prompt tokens); BOS first where the tokenizer adds one; each response
    ends with EOS; truncated to max_length."""
    ids: list[int] = []
    labels: list[int] = []
    if adds_bos(tokenizer):
        ids, labels = [tokenizer.bos_token_id], [IGNORE]
    for text, is_response in segments(turns):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_response:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if is_response else [IGNORE] * len(piece)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def build_dataset(name: str, tokenizer, *, n: int | None = None, seed: int = 1234, max_length: int = 256,
                  split: str = "train") -> datasets.Dataset:
    """A tokenised, seeded subsample of n examples that keep at least one response token."""
    if max_length < 8:
        raise DataError(f"max_length={max_length} is too short; use at least 8 tokens")
    if n is not None and n <= 0:
        raise DataError(f"n={n}: the number of examples must be positive")
    records = load_records(name, split).shuffle(seed=seed)
    want = len(records) if n is None else n
    # tokenise in chunks until n examples keep a response token (truncation can leave none)
    parts, kept, start = [], 0, 0
    while kept < want and start < len(records):
        chunk = records.select(range(start, min(len(records), start + max(2 * (want - kept), 64))))
        start += len(chunk)
        part = chunk.map(lambda r: tokenize(r["turns"], tokenizer, max_length), remove_columns=["turns"])
        part = part.filter(lambda r: any(x != IGNORE for x in r["labels"]))
        parts.append(part)
        kept += len(part)
    ds = datasets.concatenate_datasets(parts)
    if n is not None:
        if len(ds) < n:
            raise DataError(f"dataset {name!r} ({split}) has only {len(ds)} usable examples at "
                            f"max_length={max_length}; asked for n={n}")
        ds = ds.select(range(n))
    return ds


def rehearsal_count(n_stage2: int, fraction: float) -> int:
    """How many stage-1 examples make up ``fraction`` of a mix with ``n_stage2`` stage-2 examples."""
    return round(fraction * n_stage2 / (1.0 - fraction))


def mix_rehearsal(stage2: datasets.Dataset, stage1: datasets.Dataset, fraction: float,
                  seed: int = 1234) -> datasets.Dataset:
    """Stage-2 data plus stage-1 examples making up `fraction` of the mix (Scialom et al. 2022), shuffled."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"rehearsal fraction={fraction}; allowed: 0 <= fraction < 1")
    k = rehearsal_count(len(stage2), fraction)
    if k > len(stage1):
        raise DataError(f"rehearsal needs {k} stage-1 examples, only {len(stage1)} given")
    if k == 0:
        return stage2
    cols = ["input_ids", "labels"]
    replay = stage1.shuffle(seed=seed).select(range(k)).select_columns(cols)
    return datasets.concatenate_datasets([stage2.select_columns(cols), replay]).shuffle(seed=seed)


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label -100."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.as_tensor(f["input_ids"])
        labels[i, :n] = torch.as_tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, epoch: int, mega: int = 50) -> list[int]:
    """The trainer's example order for an epoch, with batches of similar lengths (less padding).

    The random permutation of (seed, epoch) that the trainer draws anyway is cut into mega-batches of
    ``mega * batch_size`` examples; each is sorted by length and cut into batches, and those batches
    are shuffled (same generator) so that no length trend runs through the steps. As with
    transformers' ``group_by_length``, the examples still move between batches from epoch to epoch;
    only within a mega-batch does length decide who shares a batch. Deterministic in (seed, epoch),
    so a resumed run sees the same batches."""
    if batch_size <= 0 or mega <= 0:
        raise UsageError(f"batch_size={batch_size}, mega={mega}: both must be positive")
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    size = mega * batch_size
    order: list[int] = []
    for start in range(0, len(perm), size):
        group = sorted(perm[start:start + size], key=lambda i: -lengths[i])  # stable: ties keep the random order
        batches = [group[s:s + batch_size] for s in range(0, len(group), batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            order += batches[b]
    return order
