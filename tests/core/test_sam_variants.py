"""SAM every k updates: k=1 is SAM, the cycle is counted by the optimizer and survives a resume."""
import copy

import pytest
import torch

from cfsam.core.sam import SAM
from cfsam.data.models import load_model
from cfsam.training import zero
from cfsam.training.step import StepContext, _passes, build_optimizer, optimizer_step


@pytest.fixture(scope="module")
def base():
    return load_model("tiny").model.float()


def _batch(vocab: int, step: int) -> list[dict]:
    """One micro-batch per step, different every step, with a prompt and a padded row."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100
    mask[2, 7:], labels[2, 7:] = 0, -100
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


class Counting(torch.nn.Module):
    """Counts forward passes (a wrapper, as DDP: the loss goes through its forward)."""

    def __init__(self, inner):
        super().__init__()
        self.module, self.calls = inner, 0

    def forward(self, **kw):
        self.calls += 1
        return self.module(**kw)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(model, opt, steps, start=0):
    return [optimizer_step(model, opt, _batch(model.config.vocab_size, s), StepContext(max_grad_norm=1.0))
            for s in range(start, start + steps)]


def test_every_1_is_sam_bitwise(base):
    """sam_every=1 takes exactly the steps SAM took before: first_step, pass 2, clip, second_step."""
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _run(a, build_optimizer(a, "sam", 1e-3, 0.01, 0.5, False, sam_every=1), 3)
    opt = build_optimizer(b, "sam", 1e-3, 0.01, 0.5, False)  # the default, as existing callers build it
    for s in range(3):  # the SAM sequence by hand
        mb = _batch(b.config.vocab_size, s)
        n = (mb[0]["labels"][:, 1:] != -100).sum()
        _passes(b, mb, n, StepContext())
        opt.first_step(zero_grad=True)
        _passes(b, mb, n, StepContext())
        params = [p for g in opt.param_groups for p in g["params"]]
        norm = float(opt.grad_norm())
        if norm > 1.0:
            for p in params:
                p.grad.mul_(1.0 / (norm + 1e-6))
        opt.second_step(zero_grad=True)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_k_runs_one_pass_on_the_other_updates(base):
    model = Counting(copy.deepcopy(base))
    model.config = base.config
    opt = build_optimizer(model.module, "sam", 1e-3, 0.0, 0.5, False, sam_every=3)
    calls, recs = [], []
    for s in range(7):
        before = model.calls
        recs.append(optimizer_step(model, opt, _batch(base.config.vocab_size, s), StepContext(max_grad_norm=1.0)))
        calls.append(model.calls - before)
    assert calls == [2, 1, 1, 2, 1, 1, 2]
    assert [r["perturbation_norm"] is not None for r in recs] == [c == 2 for c in calls]
    assert all(r["grad_norm"] is not None for r in recs)
    assert opt.updates == 7


def test_plain_updates_are_the_base_optimizers_steps(base):
    """Between SAM updates the weights move exactly as the base optimizer (same state) moves them."""
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a = build_optimizer(a, "sam", 1e-3, 0.0, 0.5, False, sam_every=2)
    opt_b = build_optimizer(b, "sam", 1e-3, 0.0, 0.5, False, sam_every=1)
    for s in range(4):
        mb = _batch(base.config.vocab_size, s)
        if s % 2 == 0:  # both take the SAM update
            optimizer_step(a, opt_a, mb, StepContext())
            optimizer_step(b, opt_b, mb, StepContext())
        else:  # a: a plain update; b: the same base step by hand
            optimizer_step(a, opt_a, mb, StepContext())
            n = (mb[0]["labels"][:, 1:] != -100).sum()
            _passes(b, mb, n, StepContext())
            opt_b.base_optimizer.step()
            opt_b.zero_grad(set_to_none=True)
        sa, sb = _state(a), _state(b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), s


def test_kill_and_resume_mid_cycle_is_exact(base):
    whole = copy.deepcopy(base)
    _run(whole, build_optimizer(whole, "sam", 1e-3, 0.0, 0.5, False, sam_every=3), 5)
    first = copy.deepcopy(base)
    opt = build_optimizer(first, "sam", 1e-3, 0.0, 0.5, False, sam_every=3)
    _run(first, opt, 2)  # stop after a SAM and a plain update: the next one is plain
    saved_w, saved_opt = _state(first), copy.deepcopy(opt.state_dict())
    assert [g["sam_updates"] for g in saved_opt["param_groups"]] == [2, 2]
    resumed = copy.deepcopy(base)
    resumed.load_state_dict(saved_w)
    opt2 = build_optimizer(resumed, "sam", 1e-3, 0.0, 0.5, False, sam_every=3)
    opt2.load_state_dict(saved_opt)
    recs = _run(resumed, opt2, 3, start=2)
    assert [r["perturbation_norm"] is not None for r in recs] == [False, True, False]
    sw, sr = _state(whole), _state(resumed)
    assert all(torch.equal(sw[k], sr[k]) for k in sw)


def test_closure_api_honours_every():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.1, every=2)
    calls = []

    def closure():
        calls.append(1)
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    for _ in range(4):
        (w ** 2).sum().backward()
        opt.step(closure)
    assert len(calls) == 2 and opt.updates == 4
    opt.step()  # without a closure (torch.distributed.checkpoint's state creation): not an update
    assert opt.updates == 4


def test_old_state_dicts_load_as_every_update():
    w = torch.nn.Parameter(torch.ones(2))
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.1, every=3)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["sam_every"], g["sam_updates"]
    opt.load_state_dict(sd)
    assert opt.is_sam_step and opt.updates == 0 and opt.param_groups[0]["sam_every"] == 1


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_bad_every_is_named(every):
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="every="):
        SAM([w], torch.optim.SGD, rho=0.1, lr=0.1, every=every)


def test_zero_sam_counts_the_engines_steps():
    class Engine:  # what ZeroSAM reads of a DeepSpeed engine to decide
        global_steps = 0

        def zero_optimization_stage(self):
            return 2

    eng = Engine()
    zsam = zero.ZeroSAM(eng, rho=0.5, every=3)
    seen = []
    for s in range(6):
        eng.global_steps = s  # engine.step() increments it; its checkpoints keep it
        seen.append(zsam.is_sam_step)
    assert seen == [True, False, False, True, False, False]
    with pytest.raises(ValueError, match="every=0"):
        zero.ZeroSAM(eng, rho=0.5, every=0)
