"""The labelled-positions loss equals transformers' full loss, in value and in gradients."""

import pytest
import torch

from cfsam.data.models import load_model
from cfsam.training.loss import summed_loss
from references import padded_batches


def _batches(vocab: int, seed: int = 0) -> list[dict]:
    """Two right-padded micro-batches with prompt positions (label -100), of different widths."""
    return padded_batches(vocab, (([9, 14, 5], [3, 6, 2]), ([11, 7], [4, 7])), seed)


@pytest.fixture(scope="module")
def model():
    m = load_model("tiny").model.float()
    m.train()  # the tiny Llama has no dropout: train and eval give the same numbers
    return m


def _grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _reference(m, batches):
    """What training computed before: transformers' loss with the global token count."""
    m.zero_grad(set_to_none=True)
    n = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    total = 0.0
    for b in batches:
        loss = m(**b, num_items_in_batch=n).loss
        loss.backward()
        total += float(loss.detach())
    return total, _grads(m)


@pytest.mark.parametrize("chunk, recompute", [(1024, True), (5, True), (5, False)])
def test_loss_and_gradients_equal_the_full_computation(model, chunk, recompute):
    batches = _batches(model.config.vocab_size)
    want, want_g = _reference(model, batches)
    model.zero_grad(set_to_none=True)
    n = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    got, count = 0.0, 0
    for b in batches:
        s, k = summed_loss(model, b["input_ids"], b["attention_mask"], b["labels"], chunk=chunk, recompute=recompute)
        (s / n).backward()
        got += float(s.detach() / n)
        count += int(k)
    assert count == int(n)
    assert got == pytest.approx(want, rel=1e-6)
    got_g = _grads(model)
    assert got_g.keys() == want_g.keys()
    for name in want_g:  # the tied embedding/head gets both its contributions
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-5, atol=1e-6, msg=name)


def test_wrapped_model_goes_through_its_own_forward(model):
    """A wrapper (as DDP) is called itself, with logits_to_keep; the numbers are the same."""
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner
            self.calls = 0

        def forward(self, **kw):
            self.calls += 1
            return self.module(**kw)

    batches = _batches(model.config.vocab_size, seed=1)
    want, want_g = _reference(model, batches)
    model.zero_grad(set_to_none=True)
    wrapped = Wrapper(model)
    n = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    got = 0.0
    for b in batches:
        s, _ = summed_loss(wrapped, b["input_ids"], b["attention_mask"], b["labels"])
        (s / n).backward()
        got += float(s.detach() / n)
    assert wrapped.calls == len(batches)
    assert got == pytest.approx(want, rel=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want_g[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_takes_the_cross_entropy_in_fp32(model):
    b = _batches(model.config.vocab_size)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, n = summed_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
        ref = model(**b, num_items_in_batch=n).loss
    assert s.dtype == torch.float32
    assert float(s / n) == pytest.approx(float(ref), rel=2e-2)  # bf16 hidden states: close, not equal


def test_no_labelled_position_gives_zero_with_a_graph(model):
    b = _batches(model.config.vocab_size)[0]
    s, n = summed_loss(model, b["input_ids"], b["attention_mask"], torch.full_like(b["labels"], -100))
    assert int(n) == 0 and float(s) == 0.0 and s.requires_grad
    s.backward()  # a micro-batch of prompts only must not break the passes


def test_double_backward_without_recompute(model):
    """The curvature code differentiates twice: the plain chunked graph supports it."""
    b = _batches(model.config.vocab_size)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]

    def hv(loss_fn):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no second derivative
            s = loss_fn()
        g = torch.autograd.grad(s, params, create_graph=True)
        return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)

    want = hv(lambda: model(**b).loss * (b["labels"][:, 1:] != -100).sum())
    got = hv(lambda: summed_loss(model, b["input_ids"], b["attention_mask"], b["labels"], chunk=4,
                                 recompute=False)[0])
    for a, c in zip(got, want):  # fp32 second derivatives through a 49k-way softmax: compare norms
        assert float((a - c).norm()) <= 1e-5 * float(c.norm()) + 1e-6


def test_training_passes_use_it_with_the_global_token_mean(model):
    """step._passes (what optimizer_step runs) gives transformers' loss and gradients."""
    from cfsam.training.step import StepContext, _passes

    batches = _batches(model.config.vocab_size, seed=2)
    want, want_g = _reference(model, batches)
    model.zero_grad(set_to_none=True)
    n = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    got = _passes(model, batches, n, StepContext())
    assert float(got) == pytest.approx(want, rel=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want_g[name], rtol=1e-5, atol=1e-6, msg=name)
