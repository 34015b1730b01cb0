"""The Gemma 3 architecture (the ``gemma3-270m`` preset's) through every path, on ``tiny-gemma3``: a random
three-layer Gemma 3 whose two sliding-window layers see 8 tokens, shorter than the sequences here.

Each path is checked against Gemma 3's own forward (``model(**batch).loss`` / ``.logits``) and autograd on it:
the labelled-positions loss and its gradients (with final-logit soft-capping switched on too), the SAM and
ASAM steps by hand, held-out per-example losses, the evaluation's packed and prefix-cached scoring, a 3x3
landscape and the curvature's H v; and the trainer end to end (AdamW, SAM, ASAM, SAM every k, rehearsal,
Wise-FT). The real 270M model is never loaded."""
import copy

import numpy as np
import pytest
import torch

from cfsam.core.sam import SAM
from cfsam.data import formatting
from cfsam.data.models import load_model, weights_hash
from cfsam.evaluation import scoring
from cfsam.measurement import curvature, heldout, landscape
from cfsam.training import loss as loss_
from references import hvp_error, one_by_one, padded_batches
from cfsam.training.merge import wise_ft
from cfsam.training.stage import train_stage
from cfsam.training.step import StepContext, optimizer_step

WINDOW = 8


@pytest.fixture(scope="module")
def gemma():
    loaded = load_model("tiny-gemma3")
    cfg = loaded.model.config
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert cfg.sliding_window == WINDOW and cfg.layer_types.count("sliding_attention") == 2
    return loaded


def _batches(vocab: int, seed: int = 0) -> list[dict]:
    """Right-padded micro-batches with prompt positions (label -100), rows longer than the window."""
    return padded_batches(vocab, (([21, 30, 9], [5, 12, 2]), ([17, 26], [4, 20])), seed, low=3)


def _capped(model, cap):
    m = copy.deepcopy(model)
    m.config.final_logit_softcapping = cap
    return m


def _grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("cap", [None, 2.0])  # Gemma 3 270M: none; 2.0 would bend these logits a lot
@pytest.mark.parametrize("recompute", [True, False])
def test_direct_loss_and_gradients_equal_gemmas_own(gemma, cap, recompute):
    model = _capped(gemma.model, cap).train()
    batches = _batches(model.config.vocab_size)
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    model.zero_grad(set_to_none=True)
    want = 0.0
    for b in batches:  # transformers' loss, as a token mean over the whole (two micro-batch) batch
        out = model(**b, num_items_in_batch=torch.tensor(n))
        out.loss.backward()
        want += float(out.loss.detach())
    want_g = _grads(model)
    model.zero_grad(set_to_none=True)
    got = 0.0
    for b in batches:
        s, _ = loss_.summed_loss(model, b["input_ids"], b["attention_mask"], b["labels"], chunk=7,
                                 recompute=recompute)
        (s / n).backward()
        got += float(s.detach()) / n
    assert got == pytest.approx(want, rel=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want_g[name], rtol=1e-5, atol=1e-6, msg=name)  # float32 sums over threads


@pytest.mark.parametrize("cap", [None, 2.0])
def test_per_example_losses_equal_one_example_forwards(gemma, cap):
    model = _capped(gemma.model, cap).eval()
    batches = _batches(model.config.vocab_size, seed=1)
    got = heldout.per_example_losses(model, batches)
    want = one_by_one(model, batches)
    assert [k for _, k in got] == [k for _, k in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], rel=1e-5)


def test_gemma2_soft_caps_by_default_and_the_direct_path_matches():
    """Gemma 2 (in DIRECT too) soft-caps its final logits (and its attention) by default."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           query_pre_attn_scalar=8, sliding_window=WINDOW, final_logit_softcapping=1.0,
                                           pad_token_id=0, bos_token_id=2, eos_token_id=1))
    assert loss_._is_plain(model) and loss_.softcap(model) == 1.0
    b = _batches(300)[0]
    out = model(**b)
    out.loss.backward()
    want_g = _grads(model)
    model.zero_grad(set_to_none=True)
    s, n = loss_.summed_loss(model, b["input_ids"], b["attention_mask"], b["labels"], chunk=5)
    (s / n).backward()
    assert float(s.detach() / n) == pytest.approx(float(out.loss.detach()), rel=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want_g[name], rtol=1e-5, atol=1e-7, msg=name)


def test_an_architecture_outside_direct_runs_its_own_forward():
    """Cohere scales its logits (logit_scale) after the head: the direct path would miss it, so its own
    forward runs (logits_to_keep), and the loss and gradients are its own."""
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, logit_scale=0.3,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2))
    assert model.config.model_type not in loss_.DIRECT and not loss_._is_plain(model)
    b = _batches(300)[0]
    out = model(**b)
    out.loss.backward()
    want_g = _grads(model)
    model.zero_grad(set_to_none=True)
    s, n = loss_.summed_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
    (s / n).backward()
    assert float(s.detach() / n) == pytest.approx(float(out.loss.detach()), rel=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want_g[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------- SAM and ASAM steps
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_by_hand_on_gemma(gemma, adaptive):
    """One SAM (ASAM) update with SGD: w - lr * grad L(w + e), e from grad L(w), all by autograd on Gemma's own loss."""
    rho, lr = 0.05, 0.5
    b = _batches(gemma.model.config.vocab_size)[0]
    ref = copy.deepcopy(gemma.model).train()
    params = list(ref.parameters())
    w = [p.detach().clone() for p in params]
    g = torch.autograd.grad(ref(**b).loss, params)
    if adaptive:
        scaled = torch.cat([(wi.abs() * gi).flatten() for wi, gi in zip(w, g)]).norm()
        e = [rho * wi.square() * gi / scaled for wi, gi in zip(w, g)]
    else:
        norm = torch.cat([gi.flatten() for gi in g]).norm()
        e = [rho * gi / norm for gi in g]
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
    g_sam = torch.autograd.grad(ref(**b).loss, params)
    want = {n: wi - lr * gi for (n, _), wi, gi in zip(ref.named_parameters(), w, g_sam)}

    model = copy.deepcopy(gemma.model).train()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)
    rec = optimizer_step(model, opt, [b], StepContext())
    assert rec["perturbation_norm"] == pytest.approx(float(torch.cat([x.flatten() for x in e]).norm()), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------- the trainer
KW = dict(lr=1e-3, epochs=1, batch_size=4, grad_accum=2, max_length=64, n_train=8, log_every=1)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma-stages")
    adamw = train_stage("tiny-gemma3", "alpaca", root / "adamw", optimizer="adamw", **KW)
    sam = train_stage("tiny-gemma3", "alpaca", root / "sam", optimizer="sam", rho=0.5, **KW)
    return root, adamw, sam


def test_adamw_and_sam_stages_train_and_reload(stages):
    root, adamw, sam = stages
    start = weights_hash(load_model("tiny-gemma3").model)
    for name, m in (("adamw", adamw), ("sam", sam)):
        assert m["status"] == "finished" and m["steps"] == [1, 2] and np.isfinite(m["loss"]).all()
        reloaded = load_model(str(root / name))
        assert type(reloaded.model).__name__ == "Gemma3ForCausalLM"
        assert reloaded.model.config.layer_types == load_model("tiny-gemma3").model.config.layer_types
        assert weights_hash(reloaded.model) == m["weights_hash"] != start
    assert sam["perturbation_norm"] == pytest.approx([0.5, 0.5], rel=1e-5)
    assert adamw["weights_hash"] != sam["weights_hash"]


def test_asam_sam_every_and_rehearsal_stages(tmp_path):
    asam = train_stage("tiny-gemma3", "alpaca", tmp_path / "asam", optimizer="sam", adaptive=True, rho=0.5, **KW)
    assert asam["status"] == "finished" and all(x > 0 for x in asam["perturbation_norm"])
    every = train_stage("tiny-gemma3", "open-platypus", tmp_path / "every", optimizer="sam", sam_every=2,
                        rehearsal_from="alpaca", rehearsal_fraction=0.2, **{**KW, "n_train": 12})
    # 12 + round(0.2 * 12 / 0.8) = 15 examples, 3 full batches of 4; SAM on the 1st and 3rd update only
    assert every["data"]["n_rehearsal"] == 3 and every["data"]["n_examples"] == 15
    assert [x is not None for x in every["perturbation_norm"]] == [True, False, True]


def test_wise_ft_merges_two_gemma_stages(stages, tmp_path):
    root, adamw, sam = stages
    out = wise_ft(root / "adamw", root / "sam", tmp_path / "merged", alpha=0.25)
    merged, a, b = (load_model(str(d)).model.state_dict() for d in (out, root / "adamw", root / "sam"))
    for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight", "model.norm.weight"):
        torch.testing.assert_close(merged[k], 0.75 * a[k] + 0.25 * b[k])


# ------------------------------------------------------------------------------------ measurement
def test_heldout_batches_start_with_the_tokenizers_own_bos_and_score_as_gemma(gemma):
    batches = heldout.heldout_batches("alpaca", gemma.tokenizer, n_examples=4, batch_size=2, max_length=48)
    assert formatting.adds_bos(gemma.tokenizer) is False  # SmolLM2's tokenizer: no BOS, as before
    model = gemma.model.eval()
    got = heldout.mean_loss(model, batches)
    with torch.no_grad():
        per = [(model(**b).loss.item(), heldout.count_items([b])) for b in batches]
    assert got == pytest.approx(sum(x * k for x, k in per) / sum(k for _, k in per), rel=1e-5)


def _naive(model, ctx, cont) -> float:
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_packed_scoring_keeps_the_sliding_window(gemma):
    """Several continuations packed in one row (a custom mask): the sliding layers still see 8 tokens."""
    model = gemma.model.eval()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, 1000, (20,), generator=g).tolist()
    conts = [torch.randint(3, 1000, (6,), generator=g).tolist() for _ in range(3)]
    got = scoring.score_groups(model, [(ctx, conts)])[0]
    assert got == pytest.approx([_naive(model, ctx, c) for c in conts], abs=1e-4)


def test_prefix_cached_scoring_on_gemma(gemma):
    """A shared 40-token prefix (longer than the window) computed once and continued from its cache."""
    model = gemma.model.eval()
    g = torch.Generator().manual_seed(1)
    pre = torch.randint(3, 1000, (40,), generator=g).tolist()
    groups = [(pre + torch.randint(3, 1000, (k,), generator=g).tolist(),
               [torch.randint(3, 1000, (3,), generator=g).tolist() for _ in range(2)]) for k in (2, 3, 5)]
    assert min(scoring.shared_prefixes([c for c, _ in groups])) >= 32  # the shape under test
    got = scoring.score_groups(model, groups, batch_size=2)
    for (ctx, conts), lls in zip(groups, got):
        assert lls == pytest.approx([_naive(model, ctx, c) for c in conts], abs=1e-4)


def test_landscape_3x3_on_gemma(gemma):
    model, batches = gemma.model, _batches(gemma.model.config.vocab_size)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    s = landscape.surface(model, batches, n=3, span=0.3, seed=2, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # restored bit for bit
    assert s.losses.shape == (3, 3) and len(np.unique(s.losses)) == 9
    assert s.center_loss == pytest.approx(heldout.mean_loss(model, batches), rel=1e-6)
    d1, d2 = (landscape.random_direction(model, 2, which=k) for k in (0, 1))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, a, b in zip(moved.parameters(), d1, d2):
            p.add_(s.x[0] * a + s.y[2] * b)
    with torch.no_grad():  # Gemma's own loss at that grid point, token-weighted over the batches
        per = [(moved(**b).loss.item(), heldout.count_items([b])) for b in batches]
    assert s.losses[0, 2] == pytest.approx(sum(x * k for x, k in per) / sum(k for _, k in per), rel=1e-5)


def test_curvature_on_gemma_matches_finite_differences(gemma):
    model = load_model("tiny-gemma3", dtype=torch.float64).model
    assert hvp_error(model, _batches(model.config.vocab_size)) < 1e-3
    batches = _batches(gemma.model.config.vocab_size)
    summary = curvature.curvature(gemma.model, batches, iters=3, probes=2)
    assert all(np.isfinite(summary[k]) for k in ("sam_sharpness", "hessian_top_eigenvalue", "hessian_trace"))
