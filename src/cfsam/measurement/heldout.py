"""Held-out losses: the mean response-token loss of a model on a fixed held-out slice (the forgetting measure)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from cfsam.core.errors import UsageError
from cfsam.training.loss import row_losses, summed_loss

IGNORE = -100


Batch = dict[str, torch.Tensor]


LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, int]"]


def response_token_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over response tokens (labels != -100), and their number.

    The LM head runs on those positions only (``cfsam.training.loss``); no checkpointing, so the
    curvature code can differentiate it twice."""
    s, n = summed_loss(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"], recompute=False)
    return s, int(n)


def mean_loss(model: torch.nn.Module, batches: Sequence[Batch], loss_fn: LossFn = response_token_loss) -> float:
    """L(theta): the loss of all batches together, weighted by their number of items (tokens); eval mode."""
    with eval_mode(model), torch.inference_mode():
        return loss_and_count(model, on_device(batches, model_params(model)[0].device), loss_fn)[0]


def loss_and_count(model, batches, loss_fn) -> tuple[float, int]:
    """(L, number of items it averages over)."""
    total, count = 0.0, 0
    for batch in batches:
        s, n = loss_fn(model, batch)
        total += float(s)
        count += n
    if count == 0:
        raise UsageError("the batches hold no labelled items (every label is -100); the loss is undefined")
    return total / count, count


def per_example_losses(model: torch.nn.Module, batches: Sequence[Batch]) -> list[tuple[float, int]]:
    """(summed response-token loss, number of response tokens) of every example, in batch order; eval mode.

    The token mean is sum(s) / sum(n) (= ``mean_loss``); the per-example means s / n weigh every
    example alike (an example with no response token left gives (0.0, 0)). The examples are run longest
    first, each batch (as many rows as the largest given) of similar lengths: in their seeded order a quarter
    of the tokens of cpu's held-out slices were padding (Alpaca's 42 %), sorted under a tenth. A loss does not
    depend on its batch (tests/measurement/test_heldout_agreement.py), so only the time changes."""
    size = max((b["input_ids"].shape[0] for b in batches), default=1)
    order, sorted_batches = by_length(batches, size)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(order)
    device = model_params(model)[0].device
    with eval_mode(model), torch.inference_mode():
        done = 0
        for batch in on_device(sorted_batches, device):
            sums, counts = row_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            for i, value in zip(order[done:], zip(sums.double().tolist(), counts.tolist())):
                out[i] = value
            done += len(counts)
    return out


def by_length(batches: Sequence[Batch], rows: int) -> tuple[list[int], list[Batch]]:
    """The batches' examples longest first, in batches of ``rows`` examples of similar lengths, each padded to
    its longest only (masked padding: any id); and, for each example in that order, its index in the given
    order. A loss that sums over examples is the same sum over these, up to the summation order."""
    from cfsam.data.formatting import collate

    if rows <= 0:
        raise UsageError(f"rows={rows}; it must be positive")
    examples = [{"input_ids": b["input_ids"][i][keep].tolist(), "labels": b["labels"][i][keep].tolist()}
                for b in batches for i, keep in enumerate(_real_tokens(b))]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    return order, [collate([examples[i] for i in order[s:s + rows]], pad_token_id=0)
                   for s in range(0, len(order), rows)]


def _real_tokens(batch: Batch) -> torch.Tensor:
    """Which positions of each row are tokens, not padding (either side)."""
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


# rows per forward when an entry's held-out losses are measured: a speed setting, not part of what is measured
# (per-example losses do not depend on the batch: tests/measurement/test_heldout_agreement.py), so not in the id
MEASURE_BATCH = 8


def heldout_batches(dataset: str, tokenizer, *, n_examples: int = 8, batch_size: int = 4, max_length: int = 128,
                    seed: int = 1234, split: str = "heldout", skip: int = 0) -> list[Batch]:
    """A fixed list of padded batches of a named training set (``cfsam.data``), tokenised once: examples
    ``skip`` to ``skip + n_examples`` of its seeded order (so two uses can take disjoint examples)."""
    from cfsam.data import formatting

    if batch_size <= 0:
        raise UsageError(f"batch_size={batch_size}; it must be positive")
    ds = formatting.build_dataset(dataset, tokenizer, n=skip + n_examples, seed=seed, max_length=max_length,
                                  split=split)
    rows = [ds[i] for i in range(skip, len(ds))]
    return [formatting.collate(rows[s:s + batch_size], tokenizer.pad_token_id) for s in range(0, len(rows), batch_size)]


def count_items(batches: Sequence[Batch]) -> int:
    """Number of response tokens the loss averages over (labels shifted by one, as in the loss)."""
    return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)


def on_device(batches: Sequence[Batch], device: torch.device) -> list[Batch]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


def split_rows(batches: Sequence[Batch], rows: int) -> list[Batch]:
    """The batches cut into micro-batches of at most ``rows`` examples, each trimmed of the columns that
    are padding in all its rows (right padding: exact, since no real token attends to a later position).
    A loss that sums over examples is the same sum over these; what a pass keeps alive shrinks with
    the rows, which matters for double backward (``curvature.hvp``) that keeps the whole graph."""
    if rows <= 0:
        raise UsageError(f"rows={rows}; it must be positive")
    out = []
    for b in batches:
        n = next(v for v in b.values() if torch.is_tensor(v)).shape[0]
        for s in range(0, n, rows):
            mb = {k: v[s:s + rows] if torch.is_tensor(v) else v for k, v in b.items()}
            mask = mb.get("attention_mask")
            if mask is not None and mask.ndim == 2 and mask.shape[1]:
                width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
                mb = {k: v[:, :width] if torch.is_tensor(v) and v.ndim == 2 else v for k, v in mb.items()}
            out.append(mb)
    return out


def model_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = list(model.parameters())  # tied weights (embeddings = lm_head) appear once
    if not params:
        raise UsageError("the model has no parameters")
    return params


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: L is a function of the weights), the previous mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Eval mode and one saved copy of the weights, copied back exactly on exit."""
    params = model_params(model)
    with torch.no_grad():
        theta0 = [p.detach().clone() for p in params]
    with eval_mode(model):
        try:
            yield theta0
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, theta0)
