"""References the tests share: padded micro-batches, and losses from one example at a time with the model's
own forward (what the package's batched and labelled-only paths must equal)."""
import torch

from cfsam.measurement import heldout


def padded_batches(vocab: int, shapes, seed: int = 0, low: int = 0) -> list[dict]:
    """Right-padded micro-batches, one per (lengths, prompt lengths) of ``shapes``: prompt positions are
    labelled -100, padding is token 0 with mask 0; token ids drawn from [low, vocab)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths, prompts in shapes:
        width = max(lengths)
        ids = torch.randint(low, vocab, (len(lengths), width), generator=g)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (n, p) in enumerate(zip(lengths, prompts)):
            mask[i, :n] = 1
            labels[i, p:n] = ids[i, p:n]
        ids[mask == 0] = 0  # the pad token
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def one_by_one(model, batches) -> list[tuple[float, int]]:
    """(summed loss, labelled tokens) of every example, each forwarded alone through ``model(**batch).loss``."""
    out = []
    with torch.no_grad():
        for b in batches:
            for i in range(b["labels"].shape[0]):
                one = {k: v[i:i + 1] for k, v in b.items()}
                n = heldout.count_items([one])
                out.append((model(**one).loss.item() * n, n))
    return out


def hvp_error(model, batches, eps: float = 1e-5) -> float:
    """Relative error of ``curvature.hvp`` along a seeded random direction against central finite differences
    of the gradient (truncation error ~eps^2; a float64 model, else rounding dominates)."""
    from cfsam.measurement import curvature

    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    hv = curvature.hvp(model, batches, v)
    grads = []
    for sign in (1, -1):
        with torch.no_grad():
            torch._foreach_add_(params, v, alpha=sign * eps)
        grads.append(curvature.gradient(model, batches)[1])
        with torch.no_grad():
            torch._foreach_add_(params, v, alpha=-sign * eps)
    fd = torch.cat([(a - b).flatten() / (2 * eps) for a, b in zip(*grads)])
    hv = torch.cat([t.flatten() for t in hv])
    return ((hv - fd).norm() / fd.norm()).item()
