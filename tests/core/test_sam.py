"""SAM against hand computations, invariants, and 2-process sharded runs."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfsam.core.sam import SAM

ROOT = Path(__file__).resolve().parents[2]


# A quadratic with a closed-form gradient, split over two tensors so the norm must be global:
# L(w1, w2) = 0.5 |A w1 - b|^2 + 0.5 |C w2 - d|^2,  grad = (A^T (A w1 - b), C^T (C w2 - d)).
def _problem():
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    C, d = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    w1 = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    w2 = torch.nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))

    def loss():
        return 0.5 * (A @ w1 - b).square().sum() + 0.5 * (C @ w2 - d).square().sum()

    def grad(v1, v2):
        return A.T @ (A @ v1 - b), C.T @ (C @ v2 - d)

    return (w1, w2), loss, grad


def _hand_sam(w, grad, rho, adaptive=False):
    """The gradient at the perturbed point, computed by hand."""
    g = grad(*w)
    if adaptive:
        norm = math.sqrt(sum(((wi.abs() * gi) ** 2).sum().item() for wi, gi in zip(w, g)))
        e = [rho * wi ** 2 * gi / norm for wi, gi in zip(w, g)]
    else:
        norm = math.sqrt(sum((gi ** 2).sum().item() for gi in g))
        e = [rho * gi / norm for gi in g]
    return e, grad(*(wi + ei for wi, ei in zip(w, e)))


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_step_sgd_and_adamw_match_hand_computation(adaptive):
    rho, lr, wd = 0.3, 0.1, 0.01
    for base in ("sgd", "adamw"):
        params, loss, grad = _problem()
        w0 = [p.detach().clone() for p in params]
        if base == "sgd":
            sam = SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)
        else:
            sam = SAM(params, torch.optim.AdamW, rho=rho, adaptive=adaptive, lr=lr, weight_decay=wd)
        loss().backward()
        sam.first_step()
        e, g_adv = _hand_sam(w0, grad, rho, adaptive)
        for p, w, ei in zip(params, w0, e):
            torch.testing.assert_close(p.detach(), w + ei, rtol=1e-12, atol=1e-12)
        expect_norm = math.sqrt(sum((ei ** 2).sum().item() for ei in e))
        assert sam.last_perturbation_norm == pytest.approx(expect_norm, rel=1e-6)
        if not adaptive:
            assert sam.last_perturbation_norm == pytest.approx(rho, rel=1e-6)
        loss().backward()
        sam.second_step()
        for p, w, g in zip(params, w0, g_adv):
            if base == "sgd":
                expect = w - lr * g
            else:  # AdamW, first step: bias-corrected m/sqrt(v) = g/|g|
                expect = w * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
            torch.testing.assert_close(p.detach(), expect, rtol=1e-10, atol=1e-12)


def test_step_with_closure_equals_explicit_steps():
    outs = []
    for use_closure in (False, True):
        params, loss, _ = _problem()
        sam = SAM(params, torch.optim.AdamW, rho=0.5, lr=0.05)
        for _ in range(3):
            loss().backward()
            if use_closure:
                sam.step(lambda: loss().backward())
            else:
                sam.first_step()
                loss().backward()
                sam.second_step()
        outs.append([p.detach().clone() for p in params])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_zero_gradient_gives_no_nan_and_no_perturbation():
    p = torch.nn.Parameter(torch.ones(4))
    sam = SAM([p], torch.optim.AdamW, rho=2.0, lr=0.1, weight_decay=0.0)
    p.grad = torch.zeros(4)
    assert sam.first_step() == 0
    assert torch.equal(p.detach(), torch.ones(4))
    assert sam.last_perturbation_norm == 0.0
    p.grad = torch.zeros(4)
    sam.second_step()
    assert torch.isfinite(p).all()


def test_restore_is_exact_where_subtracting_is_not():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10_000) * 1e-3)
    w0 = p.detach().clone()
    sam = SAM([p], torch.optim.SGD, rho=2.0, lr=0.1)
    p.grad = torch.randn(10_000)
    g = p.grad.clone()
    sam.first_step()
    # w + e - e is not w in float32 (rounding at |e| >> |w|) ...
    e = 2.0 * g / g.norm()
    assert not torch.equal((w0 + e) - e, w0)
    sam.restore()
    assert torch.equal(p.detach(), w0)  # ... the saved copy is
    assert not sam._saved


def test_extra_memory_is_one_copy_of_the_parameters_and_freed():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=1.0, lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    sam.first_step()
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(t.numel() for t in sam._saved.values()) == n_params
    model(torch.randn(3, 8)).sum().backward()
    sam.second_step()
    assert not sam._saved
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in sam.state.values())


def test_non_finite_gradient_skips_and_second_step_refuses():
    p = torch.nn.Parameter(torch.ones(3))
    sam = SAM([p], torch.optim.SGD, rho=1.0, lr=0.1)
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not torch.isfinite(sam.first_step())
    assert torch.equal(p.detach(), torch.ones(3))
    with pytest.raises(RuntimeError, match="first_step"):
        sam.second_step()


def test_state_dict_round_trip_continues_identically():
    def run(steps, sam, loss):
        for _ in range(steps):
            loss().backward()
            sam.first_step()
            loss().backward()
            sam.second_step()

    params, loss, _ = _problem()
    sam = SAM(params, torch.optim.AdamW, rho=0.5, adaptive=True, lr=0.05)
    run(2, sam, loss)
    saved_sd = copy.deepcopy(sam.state_dict())  # state_dict() holds live tensors
    saved_w = [p.detach().clone() for p in params]
    run(2, sam, loss)
    assert saved_sd["param_groups"][0]["rho"] == 0.5 and "exp_avg" in saved_sd["state"][0]

    params2, loss2, _ = _problem()
    with torch.no_grad():
        for p, w in zip(params2, saved_w):
            p.copy_(w)
    sam2 = SAM(params2, torch.optim.AdamW, rho=9.0, adaptive=False, lr=1.0)  # overwritten by the load
    sam2.load_state_dict(saved_sd)
    assert sam2.base_optimizer.state is sam2.state and sam2.base_optimizer.param_groups is sam2.param_groups
    run(2, sam2, loss2)
    for a, b in zip(params, params2):
        assert torch.equal(a.detach(), b.detach())


def test_lr_scheduler_on_base_optimizer_drives_both():
    params, loss, _ = _problem()
    sam = SAM(params, torch.optim.SGD, rho=0.1, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(sam.base_optimizer, lambda s: 0.5 ** s)
    loss().backward()
    sam.first_step()
    loss().backward()
    sam.second_step()
    sched.step()
    assert sam.param_groups[0]["lr"] == 0.5


def test_bad_arguments_are_named():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="rho=0"):
        SAM(p, torch.optim.SGD, rho=0, lr=0.1)
    with pytest.raises(ValueError, match="sharded"):
        SAM(p, torch.optim.SGD, rho=1.0, sharded="yes", lr=0.1)
    fake = torch.nn.Parameter(torch.ones(2))
    fake._fsdp_flattened = True
    with pytest.raises(ValueError, match="FSDP1"):
        SAM([fake], torch.optim.SGD, rho=1.0, lr=0.1)


def test_bf16_autocast_perturbation_radius_is_rho():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=2.0, lr=1e-3)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    w0 = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # fp32 master grads
    sam.first_step()
    radius = math.sqrt(sum((p.detach() - w).pow(2).sum().item() for p, w in zip(model.parameters(), w0)))
    assert radius == pytest.approx(2.0, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.mse_loss(model(x).float(), y).backward()
    sam.second_step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_two_process_ddp_fsdp1_fsdp2_and_flat_shards(tmp_path):
    """Radius rho and weights equal to one process on the global batch; per-shard norms give rho*sqrt(2)."""
    out = tmp_path / "sam.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "tests" / "dist" / "sam_sharded.py"), str(out)], check=True, env=env, timeout=300)
    r = json.loads(out.read_text())
    rho = 0.5
    assert r["sam_reference_radii"] == pytest.approx([rho] * 3, rel=1e-6)
    for tag in ("sam", "asam"):
        ref = r[f"{tag}_reference_radii"]
        for name in ("ddp", "fsdp1", "fsdp2", "flat_sharded"):
            got = r[f"{tag}_{name}"]
            assert got["radii"] == pytest.approx(ref, rel=1e-5), (tag, name)
            assert got["max_diff"] < 1e-5, (tag, name)
            if "reported" in got:
                assert got["reported"] == pytest.approx(ref, rel=1e-5), (tag, name)
    # the bug of per-rank norms under sharding: every shard moves by rho, so the ball has radius rho*sqrt(W)
    for name in ("sam_fsdp2_per_shard", "sam_flat_per_shard"):
        assert r[name]["radii"] == pytest.approx([rho * math.sqrt(r["world_size"])] * 3, rel=1e-5)


def test_zero_engine_config_and_bad_arguments_are_named():
    from cfsam.training import zero

    cfg = zero.engine_config(3, micro_batch=2, grad_accum=4, world=8, max_grad_norm=None)
    # DeepSpeed checks train_batch_size = micro x accumulation x world; no clipping is 0 for it
    assert cfg["train_batch_size"] == 2 * 4 * 8 and cfg["gradient_clipping"] == 0.0
    assert cfg["zero_optimization"] == {"stage": 3}
    with pytest.raises(ValueError, match=r"ZeRO stage 0 .*allowed: 1 \| 2 \| 3.*dist='ddp'"):
        zero.engine_config(0, 2, 1, 2, 1.0)
    with pytest.raises(ValueError, match="rho=0"):
        zero.ZeroSAM(engine=None, rho=0)


@pytest.mark.slow
def test_two_process_deepspeed_zero_stages_match_one_process(tmp_path):
    """ZeroSAM on DeepSpeed ZeRO-1/2/3 engines: radius of the move the forward sees = the one-process
    radius (rho for SAM: the norm is global over the partitions), exact restore, final weights of
    SAM, ASAM and plain AdamW equal to one process on the global batch."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "tests" / "dist" / "sam_deepspeed.py"), str(out)], check=True, env=env, timeout=600)
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["reference_sam_radii"] == pytest.approx([0.5] * 3, rel=1e-6)
    for stage in (1, 2, 3):
        for tag in ("adamw", "sam", "asam"):
            got = r[f"zero{stage}_{tag}"]
            # float noise is ~3e-8 here; forward weights left unperturbed (stale gathered ZeRO-3 copies) give ~4e-2
            assert got["max_diff"] < 1e-6, (stage, tag)
            if tag == "adamw":
                continue
            ref = r[f"reference_{tag}_radii"]
            assert got["radii"] == pytest.approx(ref, rel=1e-5), (stage, tag)
            assert got["reported"] == pytest.approx(ref, rel=1e-5), (stage, tag)
            assert got["restore_err"] == [0.0] * 3, (stage, tag)  # restored by copy: bitwise
