"""The next-token loss on the labelled positions only: the LM head never sees prompt or padding.

``model(**batch).loss`` (transformers) multiplies the hidden state of *every* position by the
(vocab, hidden) head and takes a log-softmax over the whole vocabulary for each, then drops the
positions whose next token has no label (-100: the prompt and the padding under response-only
training). For SmolLM2-135M the head is a fifth of the model's multiply-adds per position, and its
(positions, vocab) fp32 logits and their log-softmax are the largest activations of a step. Here:

1. the decoder (``model.model``, final norm included) gives the hidden states (B, T, H);
2. only the positions t whose token t+1 is labelled are kept (the causal shift, as in the loss);
3. the head and the cross-entropy run ``chunk`` positions at a time, each chunk under activation
   checkpointing when gradients are wanted: logits exist for one chunk at a time, in the forward and
   in the backward (which recomputes a chunk's logits: one more head product on the labelled
   positions, against the head products on all unlabelled positions that are never made).

The cross-entropy is taken on fp32 logits under autocast too, as transformers' ``ForCausalLMLoss`` does.

Between the head and the loss a causal LM may transform its logits. Of the architectures whose forward
we reproduce (``DIRECT``), Gemma 2 soft-caps them (``cap * tanh(logits / cap)``, ``final_logit_softcapping``;
Gemma 3 keeps the option, off in its released models), which is applied here after the head; Gemma's
embedding scaling by sqrt(hidden) happens inside the decoder. Any other architecture (Cohere's
``logit_scale``, Granite's ``logits_scaling``, ...) takes the wrapper path below: its own forward applies
whatever it does, on the kept positions only.

Wrapped models (DDP, FSDP2 ``fully_shard``, a DeepSpeed engine) must run their own forward, or their
hooks (gradient reduction, parameter gathering) do not fire: calling ``ddp.module.model(...)`` would
silently skip DDP's reduction bookkeeping, and under FSDP2 the root's weights would still be sharded.
There the wrapper is called with ``logits_to_keep=<the same boolean mask>`` (transformers >= 5 then
applies the head inside the forward to the kept positions only, flattened): the head cost is saved
the same way, only the chunking (a memory saving) is not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK = 1024  # positions per head product: 1024 x 49152 fp32 logits = 192 MiB for SmolLM2
# model_types whose causal LM's logits are lm_head(decoder(...)), then soft-capped where the config says so:
# each is checked against its own ``model(**batch).loss`` (tests/training/test_loss.py, test_gemma.py)
DIRECT = ("llama", "gemma3_text", "gemma2")


def targets_and_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): mask[b, t] is True where position t predicts a labelled token t+1;
    targets are those tokens, in the row-major order of ``hidden[mask]``."""
    nxt = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # shift the labels, not the activations
    mask = nxt != IGNORE
    return mask, nxt[mask]


def _fp32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays


def _logits(head: torch.nn.Module, hidden: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """fp32 logits of the head, soft-capped as the causal LM's forward does (Gemma's final_logit_softcapping)."""
    logits = _fp32(head(hidden))
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                cap: float | None = None) -> torch.Tensor:
    return F.cross_entropy(_logits(head, hidden, cap), targets, reduction="sum")


def softcap(model) -> float | None:
    """The final-logit soft-cap that the (plain) model's forward applies after its head, or None."""
    return getattr(model.config, "final_logit_softcapping", None) or None


def _is_plain(model) -> bool:
    """An unwrapped transformers causal LM, of an architecture whose forward we reproduce (``DIRECT``),
    whose decoder and head we may call ourselves."""
    from transformers import PreTrainedModel

    try:
        from torch.distributed.fsdp import FSDPModule  # fully_shard subclasses the model itself
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    return (isinstance(model, PreTrainedModel) and not isinstance(model, FSDPModule)
            and getattr(model.config, "model_type", None) in DIRECT
            and hasattr(model, "model") and hasattr(model, "lm_head"))


def _kept(model, input_ids, attention_mask, mask) -> tuple[torch.Tensor, bool]:
    """(the hidden states of the kept positions (n, H), True) for a plain model, or (their fp32
    logits (n, V), False) from a wrapper's own forward."""
    if _is_plain(model):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden[mask], True  # the only rows the head sees
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=mask, use_cache=False).logits
    if logits.ndim != 2 or logits.shape[0] != int(mask.sum()):
        raise RuntimeError(f"the model ignored logits_to_keep=<boolean mask> (logits {tuple(logits.shape)}); "
                           "transformers >= 5 applies it")
    return _fp32(logits), False


def summed_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, *,
                chunk: int = CHUNK, recompute: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross-entropies over labelled positions, their number as a tensor).

    Divide the sum by the number of labelled tokens of the *global* batch (all micro-batches and
    ranks: transformers' ``num_items_in_batch``) for the token mean. ``recompute``: checkpoint each
    chunk when gradients are enabled (False keeps the graph plain, e.g. for double backward)."""
    mask, targets = targets_and_mask(labels)
    kept, is_hidden = _kept(model, input_ids, attention_mask, mask)
    if not is_hidden:
        return F.cross_entropy(kept, targets, reduction="sum"), mask.sum()
    return head_loss(model.lm_head, kept, targets, chunk=chunk, recompute=recompute, cap=softcap(model)), mask.sum()


def head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, chunk: int = CHUNK,
              recompute: bool = True, cap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` (n, V), soft-capped at ``cap`` if given, against ``targets``
    (n,), ``chunk`` rows at a time."""
    use_ckpt = recompute and torch.is_grad_enabled()
    total = 0
    # at least one (maybe empty) chunk: no labelled position still gives a zero loss with a graph
    for s in range(0, max(hidden.shape[0], 1), chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        if use_ckpt:  # the chunk's logits are dropped after the forward and remade in the backward
            total = total + checkpoint(_chunk_loss, head, h, t, cap, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t, cap)
    return total


def row_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, *,
               chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (example) of the batch: the summed next-token cross-entropy over its labelled
    positions, and their number. Meant for evaluation (no checkpointing)."""
    mask, targets = targets_and_mask(labels)
    kept, is_hidden = _kept(model, input_ids, attention_mask, mask)
    if is_hidden:
        cap = softcap(model)
        losses = [F.cross_entropy(_logits(model.lm_head, kept[s:s + chunk], cap), targets[s:s + chunk],
                                  reduction="none") for s in range(0, kept.shape[0], chunk)]
        losses = torch.cat(losses) if losses else kept.new_zeros(0, dtype=torch.float32)
    else:
        losses = F.cross_entropy(kept, targets, reduction="none")
    rows = mask.nonzero()[:, 0]  # the row of each kept position, in the row-major order of hidden[mask]
    sums = losses.new_zeros(labels.shape[0]).index_add_(0, rows, losses)
    return sums, mask.sum(dim=1)
