"""Loss surfaces, interpolation and curvature: against transformers' loss, closed-form quadratics,
finite differences and hand-set weights; weights restored bit for bit."""
import copy
import json

import numpy as np
import pytest
import torch

from cfsam.analysis import plots
from cfsam.measurement import curvature
from cfsam.measurement import heldout
from cfsam.measurement import landscape
from cfsam.measurement.landscape import Line, Surface
from references import hvp_error, one_by_one


def make_batches(n_batches=2, size=2, length=12, vocab=1000, seed=0):
    """Token batches with a prompt half (label -100) and one right-padded row, like data.collate."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (size, length), generator=g)
        labels = ids.clone()
        labels[:, : length // 2] = -100
        mask = torch.ones_like(ids)
        mask[-1, -3:], labels[-1, -3:] = 0, -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, state):
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------------ loss
def test_loss_matches_transformers(tiny):
    model, batches = tiny.model, make_batches()
    with torch.no_grad():
        hf = [model(**b).loss.item() for b in batches]  # transformers' own shifted, -100-masked mean
    counts = [heldout.count_items([b]) for b in batches]
    assert heldout.mean_loss(model, batches[:1]) == pytest.approx(hf[0], rel=1e-5)
    # all batches together: token-weighted, not a mean of batch means
    assert heldout.mean_loss(model, batches) == pytest.approx(np.dot(hf, counts) / sum(counts), rel=1e-5)


def test_loss_needs_labelled_tokens(tiny):
    b = make_batches(1)[0]
    b["labels"][:] = -100
    with pytest.raises(ValueError, match="no labelled items"):
        heldout.mean_loss(tiny.model, [b])


def test_per_example_losses_match_a_one_example_loop(tiny):
    model, batches = tiny.model, make_batches(n_batches=2, size=3)
    for b in batches:  # padding and a prompt of varying length in every row
        for i in range(b["labels"].shape[0]):
            b["labels"][i, :2 + i] = -100
            b["attention_mask"][i, b["attention_mask"].shape[1] - i:] = 0
            b["labels"][i, b["attention_mask"].shape[1] - i:] = -100
    got = heldout.per_example_losses(model, batches)
    want = one_by_one(model, batches)
    assert [n for _, n in got] == [n for _, n in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], rel=1e-5)
    # the token mean derived from them is mean_loss
    assert sum(s for s, _ in got) / sum(n for _, n in got) == pytest.approx(heldout.mean_loss(model, batches), rel=1e-6)


# ------------------------------------------------------------------------------------ directions
def test_directions_seeded_and_filter_normalised(tiny):
    model = tiny.model
    params = list(model.parameters())
    d = landscape.random_direction(model, 3, filter_norm=True, ignore_1d=True)
    assert all(torch.equal(x, y) for x, y in zip(d, landscape.random_direction(model, 3)))
    other = landscape.random_direction(model, 3, which=1)
    assert not torch.equal(d[0], other[0])
    for p, x in zip(params, d):
        assert x.shape == p.shape and x.dtype == p.dtype
        if p.dim() == 1:
            assert not x.any()
        else:  # each output row has the norm of the same row of theta (Li et al. 2018)
            torch.testing.assert_close(x.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    kept = landscape.random_direction(model, 3, ignore_1d=False)
    for p, x in zip(params, kept):
        if p.dim() == 1:
            assert x.norm().item() == pytest.approx(p.norm().item(), rel=1e-5)
    # raw Gaussian entries do not depend on the options
    raw, raw_kept = (landscape.random_direction(model, 3, filter_norm=False, ignore_1d=i) for i in (True, False))
    assert all(torch.equal(a, b) for a, b, p in zip(raw, raw_kept, params) if p.dim() > 1)
    assert abs(torch.cat([x.flatten() for x in raw_kept]).std().item() - 1) < 0.01


# -------------------------------------------------------------------------------------- surfaces
def test_surface_restores_weights_bit_identical(tiny):
    model, batches = tiny.model, make_batches()
    state = snapshot(model)
    model.train()
    s = landscape.surface(model, batches, n=3, span=0.5, seed=1, progress=False)
    assert_bit_identical(model, state)
    assert model.training  # the mode is restored too
    model.eval()
    assert s.losses.shape == (3, 3) and np.isfinite(s.losses).all()
    assert len(np.unique(s.losses)) == 9  # the weights did move


def test_surface_restores_weights_after_an_error(tiny):
    model, state, calls = tiny.model, snapshot(tiny.model), []

    def failing(m, batch):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return heldout.response_token_loss(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        landscape.surface(model, make_batches(), n=3, span=0.5, loss_fn=failing, progress=False)
    assert_bit_identical(model, state)


def test_surface_points_are_the_perturbed_losses(tiny):
    model, batches = tiny.model, make_batches()
    s = landscape.surface(model, batches, n=3, span=0.3, seed=5, progress=False)
    assert s.center_loss == heldout.mean_loss(model, batches)  # theta0 itself is the centre point
    # an off-centre, off-diagonal point, set by hand on a copy: losses[i, j] is at x[i] d1 + y[j] d2
    d1 = landscape.random_direction(model, 5, which=0)
    d2 = landscape.random_direction(model, 5, which=1)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, a, b in zip(moved.parameters(), d1, d2):
            p.add_(s.x[0] * a + s.y[2] * b)
    assert s.losses[0, 2] == pytest.approx(heldout.mean_loss(moved, batches), rel=1e-5)
    assert s.losses[0, 2] != pytest.approx(s.losses[2, 0], rel=1e-5)
    # same seed, same surface; another seed, another one
    again = landscape.surface(model, batches, n=3, span=0.3, seed=5, progress=False)
    np.testing.assert_array_equal(again.losses, s.losses)
    assert not np.array_equal(landscape.surface(model, batches, n=3, span=0.3, seed=6, progress=False).losses,
                              s.losses)


@pytest.mark.parametrize("kwargs,match", [({"n": 4}, "odd"), ({"n": 1}, "odd"), ({"span": 0.0}, "span"),
                                          ({"span": float("nan")}, "span")])
def test_surface_bad_settings(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        landscape.surface(tiny.model, make_batches(), **kwargs)


def test_surface_save_load_roundtrip(tiny, tmp_path):
    s = landscape.surface(tiny.model, make_batches(), n=3, span=0.2, seed=2, progress=False,
                          model_info={"name": "tiny"}, data_info={"dataset": "hand-made"})
    stem = s.save(tmp_path / "sub" / "surface-seed2")
    assert sorted(p.name for p in stem.parent.iterdir()) == ["surface-seed2.json", "surface-seed2.npz"]
    for path in (stem, tmp_path / "sub" / "surface-seed2.json"):
        back = Surface.load(path)
        for f in ("x", "y", "losses"):
            np.testing.assert_array_equal(getattr(back, f), getattr(s, f))
        assert (back.seed, back.settings, back.model, back.data) == (s.seed, s.settings, s.model, s.data)
        assert back.flatness() == s.flatness()
    assert s.data["dataset"] == "hand-made" and s.data["items"] == heldout.count_items(make_batches())
    with pytest.raises(ValueError, match="Line"):
        Line.load(stem)


def test_flatness_over_seeds(tiny):
    surfaces, summary = landscape.flatness_over_seeds(tiny.model, make_batches(), seeds=[0, 1], n=3, span=0.5,
                                                      progress=False)
    assert [s.seed for s in surfaces] == [0, 1]
    for m in ("SC", "AG", "MAG"):
        values = [s.flatness()[m] for s in surfaces]
        assert summary[m]["values"] == values
        assert summary[m]["mean"] == pytest.approx(np.mean(values))
        assert summary[m]["std"] == pytest.approx(np.std(values, ddof=1))
    assert landscape.summarize_flatness(surfaces[:1])["SC"]["std"] is None


# ---------------------------------------------------------------------------------- interpolation
def test_interpolation_endpoints_are_the_models_losses(tiny):
    from cfsam.data.models import load_model

    a, batches = tiny.model, make_batches()
    b = load_model("tiny").model
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in b.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    state = snapshot(a)
    line = landscape.interpolate(a, b, batches, t=3, progress=False)
    assert_bit_identical(a, state)
    np.testing.assert_array_equal(line.t, [0.0, 0.5, 1.0])
    assert line.losses[0] == pytest.approx(heldout.mean_loss(a, batches), rel=1e-6)
    assert line.losses[-1] == pytest.approx(heldout.mean_loss(b, batches), rel=1e-6)
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for p, q in zip(mid.parameters(), b.parameters()):
            p.copy_((p + q) / 2)
    assert line.losses[1] == pytest.approx(heldout.mean_loss(mid, batches), rel=1e-5)


def test_interpolation_needs_one_architecture(tiny):
    with pytest.raises(ValueError, match="same architecture"):
        landscape.interpolate(tiny.model, torch.nn.Linear(3, 1), make_batches())


# -------------------------------------------------------------- curvature on a known quadratic
def mse(model, batch):
    r = model(batch["x"]).squeeze(-1) - batch["y"]
    return (r**2).sum(), len(r)


@pytest.fixture
def quadratic():
    """y ~ w.x + b with MSE: L is quadratic in (w, b) with Hessian H = 2 A^T A / n, A = [X, 1]."""
    g = np.random.default_rng(0)
    X = g.normal(size=(40, 5)) * np.array([3.0, 1.0, 1.0, 0.5, 0.2])  # a clear top eigenvalue
    y = g.normal(size=40)
    model = torch.nn.Linear(5, 1, dtype=torch.float64)
    batches = [{"x": torch.tensor(X[s:s + 20]), "y": torch.tensor(y[s:s + 20])} for s in (0, 20)]
    A = np.hstack([X, np.ones((40, 1))])
    theta = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    return model, batches, 2 * A.T @ A / 40, 2 * A.T @ (A @ theta - y) / 40


def test_hvp_is_the_hessian_times_v(quadratic):
    model, batches, H, _ = quadratic
    v = np.arange(1.0, 7.0)
    hv = curvature.hvp(model, batches, [torch.tensor(v[:5]).view(1, 5), torch.tensor(v[5:])], loss_fn=mse)
    np.testing.assert_allclose(torch.cat([t.flatten() for t in hv]).numpy(), H @ v, rtol=1e-10)


def test_hessian_top_eigenvalue_of_quadratic(quadratic):
    model, batches, H, _ = quadratic
    top = curvature.hessian_top_eigenvalue(model, batches, iters=500, tol=1e-12, loss_fn=mse)
    assert top == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-6)


def test_hutchinson_trace_of_quadratic(quadratic):
    model, batches, H, _ = quadratic
    est, se = curvature.hessian_trace(model, batches, probes=1000, seed=1, loss_fn=mse)
    assert se < 0.05 * np.trace(H)
    assert abs(est - np.trace(H)) < 4 * se


def test_sam_sharpness_of_quadratic(quadratic):
    model, batches, H, grad = quadratic
    state = snapshot(model)
    rho = 0.3
    out = curvature.sam_sharpness(model, batches, rho=rho, loss_fn=mse)
    assert_bit_identical(model, state)
    u = grad / np.linalg.norm(grad)
    # exact for a quadratic: L(theta + rho u) - L(theta) = rho |g| + rho^2 u^T H u / 2
    assert out["grad_norm"] == pytest.approx(np.linalg.norm(grad), rel=1e-10)
    assert out["sharpness"] == pytest.approx(rho * np.linalg.norm(grad) + rho**2 * u @ H @ u / 2, rel=1e-9)
    with pytest.raises(ValueError, match="rho"):
        curvature.sam_sharpness(model, batches, rho=-1.0, loss_fn=mse)


def test_curvature_summary_keys(quadratic):
    model, batches, H, _ = quadratic
    c = curvature.curvature(model, batches, iters=200, probes=4, loss_fn=mse)
    assert {"loss", "grad_norm", "sam_sharpness", "hessian_top_eigenvalue", "hessian_trace",
            "hessian_trace_stderr"} <= set(c)
    assert c["hessian_top_eigenvalue"] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-3)


def test_hvp_through_the_language_model_matches_finite_differences():
    """Double backward through attention (math kernel), batch weighting: H v ~ central difference of gradients."""
    from cfsam.data.models import load_model

    model = load_model("tiny", dtype=torch.float64).model
    # eps 1e-5: below it the model's float32 parts (RoPE) dominate the finite difference
    assert hvp_error(model, make_batches(length=8), eps=1e-5) < 1e-3


def test_hvp_in_micro_batches_of_rows_equals_whole_batches(monkeypatch):
    """Cutting batches into rows (trimmed of shared padding) keeps the losses per example and H v."""
    from cfsam.data.models import load_model

    model = load_model("tiny", dtype=torch.float64).model
    batches = make_batches(size=3, length=10)
    for b in batches:  # a row that ends early: its micro-batch is trimmed to its own length
        b["attention_mask"][1, -4:], b["labels"][1, -4:] = 0, -100
    rows = heldout.split_rows(batches, 1)
    assert [r["input_ids"].shape for r in rows[:3]] == [(1, 10), (1, 6), (1, 7)]
    np.testing.assert_allclose(heldout.per_example_losses(model, rows), heldout.per_example_losses(model, batches),
                               rtol=1e-10)
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
         for p in model.parameters()]
    flat = {}
    for k in (1, 100):
        monkeypatch.setattr(curvature, "HVP_ROWS", k)
        flat[k] = torch.cat([t.flatten() for t in curvature.hvp(model, batches, v)])
    assert ((flat[1] - flat[100]).norm() / flat[100].norm()).item() < 1e-10
    with pytest.raises(ValueError, match="rows=0"):
        heldout.split_rows(batches, 0)
    assert curvature.hvp_rows(torch.device("cpu")) == curvature.HVP_ROWS
    assert curvature.hvp_rows(torch.device("meta")) == curvature.HVP_ROWS_ACCELERATOR  # any accelerator


# ------------------------------------------------------------------------------------------ plots
def test_plots_share_one_colour_scale(tmp_path):
    x = np.linspace(-1, 1, 5)
    X, Y = np.meshgrid(x, x, indexing="ij")
    surfaces = {"flat": Surface(x, x, 1 + 0.1 * X**2, 0), "sharp": Surface(x, x, 1 + 3 * (X**2 + Y**2), 0)}
    fig = plots.contour_grid(surfaces)
    norms = {(c.norm.vmin, c.norm.vmax) for ax in fig.axes[:2] for c in ax.collections if c.norm is not None}
    assert norms == {(1.0, 7.0)}  # the joint min and max of both surfaces
    fig3d = plots.surface_grid(surfaces)
    assert len({ax.get_zlim() for ax in fig3d.axes[:2]}) == 1 and fig3d.axes[0].get_zlim()[1] == 7.0
    assert {(c.norm.vmin, c.norm.vmax) for ax in fig3d.axes[:2] for c in ax.collections} == {(1.0, 7.0)}
    for f, name in ((fig, "contour.png"), (fig3d, "surface.pdf")):
        path = plots.save_figure(f, tmp_path / name, close=True)
        assert path.read_bytes()[:4] in (b"\x89PNG", b"%PDF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contour.png", "surface.pdf"]


# ------------------------------------------------------------------------------------ cfsam measure
def test_cfsam_measure_runs_the_presets_measurement_on_one_model(tmp_path, capsys, monkeypatch):
    """The same spec and code as run-missing's (its stage-1 experiment's), on any model."""
    from cfsam import cli
    from cfsam.pipeline import specs

    monkeypatch.setenv("CFSAM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.json"
    assert cli.main(["measure", "tiny", "--preset", "smoke", "--what", "heldout,landscape", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    spec = specs.expand("smoke")["stage1"]["measure"]
    assert report["measure"]["landscape"] == spec["landscape"] and report["eval"]["tasks"] == {}
    assert report["landscape"]["flatness"]["SC"]["seeds"] == spec["landscape"]["seeds"]
    per = report["heldout_loss"]["alpaca"]["per_example"]
    assert len(per) == spec["heldout"]["n"]
    assert report["heldout_loss"]["alpaca"]["loss"] == pytest.approx(sum(s for s, _ in per) / sum(n for _, n in per))
    assert '"flatness"' in capsys.readouterr().out
    assert cli.main(["measure", "tiny", "--what", "heldout,vibes", "--out", str(out)]) == 2  # before loading
