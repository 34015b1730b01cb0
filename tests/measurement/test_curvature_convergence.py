"""Power iteration reports how far it converged (issue 26: two H200 estimates, -57 and 5,680 among values
near 90, had not); checked against the same iteration done by hand in numpy on a quadratic's Hessian, and
the analysis leaves a flagged estimate out of its correlations."""
import numpy as np
import pandas as pd
import pytest
import torch

from cfsam.measurement import curvature


def mse(model, batch):
    r = model(batch["x"]).squeeze(-1) - batch["y"]
    return (r**2).sum(), len(r)


def quadratic(spread):
    """A linear least-squares model: L is quadratic in (w, b), H = 2 A^T A / n with A = [X, 1]; ``spread``
    scales the first feature (a large one: a clear top eigenvalue, fast convergence)."""
    g = np.random.default_rng(0)
    X = g.normal(size=(40, 5)) * np.array([spread, 1.0, 1.0, 0.5, 0.2])
    y = g.normal(size=40)
    model = torch.nn.Linear(5, 1, dtype=torch.float64)
    batches = [{"x": torch.tensor(X[s:s + 20]), "y": torch.tensor(y[s:s + 20])} for s in (0, 20)]
    A = np.hstack([X, np.ones((40, 1))])
    return model, batches, 2 * A.T @ A / 40


def by_hand(H, iters, seed=0):
    """Rayleigh quotients of the power iteration from the same seeded start vector as curvature's."""
    g = torch.Generator().manual_seed(seed)
    v = np.concatenate([torch.randn(s, generator=g, dtype=torch.float32).double().numpy().ravel()
                        for s in ((1, 5), (1,))])
    q = []
    for _ in range(iters):
        v = v / np.linalg.norm(v)
        hv = H @ v
        q.append(v @ hv)
        v = hv
    return q


def test_a_converged_estimate_says_so():
    model, batches, H = quadratic(3.0)
    out = curvature.power_iteration(model, batches, iters=500, tol=1e-12, loss_fn=mse)
    assert out["eigenvalue"] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-9)
    assert out["converged"] and out["rel_change"] <= 1e-12 and out["iterations"] < 500


def test_an_unconverged_estimate_is_flagged_with_its_last_change():
    model, batches, H = quadratic(1.1)  # the top two eigenvalues close: slow convergence
    out = curvature.power_iteration(model, batches, iters=3, tol=1e-12, loss_fn=mse)
    q = by_hand(H, 3)
    assert out["eigenvalue"] == pytest.approx(q[-1], rel=1e-9)
    assert out["rel_change"] == pytest.approx(abs(q[2] - q[1]) / abs(q[2]), rel=1e-6)
    assert out["rel_change"] > curvature.CONVERGED_TOL and out["converged"] is False and out["iterations"] == 3
    one = curvature.power_iteration(model, batches, iters=1, loss_fn=mse)  # nothing to compare with
    assert (one["rel_change"], one["converged"]) == (None, False)


def test_the_curvature_summary_carries_the_flag():
    model, batches, _ = quadratic(1.1)
    c = curvature.curvature(model, batches, iters=3, probes=2, loss_fn=mse)
    assert c["hessian_top_eigenvalue_converged"] is False and c["hessian_top_eigenvalue_iters"] == 3
    assert c["hessian_top_eigenvalue_rel_change"] > curvature.CONVERGED_TOL


def test_flatness_vs_forgetting_leaves_flagged_estimates_out(monkeypatch):
    """report.flatness_vs_forgetting: an unconverged eigenvalue (a wild one, which would flip the ranking)
    is left out of that measure only; the other measures keep every run."""
    from cfsam.analysis import report

    forgot = [0.1, 0.2, 0.3, 0.4, 0.5]
    entries = {"base": {"status": "ok", "heldout_loss": {"alpaca": {"loss": 1.0}}}}
    for i, f in enumerate(forgot):
        entries[f"run{i}"] = {"status": "ok", "heldout_loss": {"alpaca": {"loss": 1.0 + f}},
                              "landscape": {"flatness": {"SC": {"mean": 10.0 + i}},
                                            "curvature": {"hessian_top_eigenvalue": [50.0, 60.0, 70.0, 80.0, -57.0][i],
                                                          "hessian_top_eigenvalue_converged": i != 4}}}
    monkeypatch.setattr(report, "load_results", lambda preset, names: entries)
    monkeypatch.setattr(report, "load_preset", lambda preset: {"stage1": {"dataset": "alpaca"}})
    table = report.flatness_vs_forgetting("any", [], n_boot=50)
    assert table.loc["SC", "runs"] == 5 and table.loc["SC", "Spearman rho"] == pytest.approx(1.0)
    assert table.loc["SC", "p"] == pytest.approx(2 / 120)  # exact: 1 of the 5! pairings in each tail
    assert table.loc["Hessian top eigenvalue", "runs"] == 4
    assert table.loc["Hessian top eigenvalue", "Spearman rho"] == pytest.approx(1.0)  # -57 would make it 0
    assert table.loc["Hessian top eigenvalue", "entries"] == "run0 run1 run2 run3"


def test_the_frontier_correlation_leaves_flagged_estimates_out(monkeypatch):
    """frontier.flatness_vs_forgetting, on stage-2 end points: the same rule."""
    from cfsam.analysis import frontier

    eig = [50.0, 60.0, 70.0, 80.0, -57.0]
    entries = {f"run{i}": {"landscape": {"flatness": {"SC": {"mean": 10.0 + i}},
                                         "curvature": {"hessian_top_eigenvalue": e,
                                                       "hessian_top_eigenvalue_converged": i != 4}}}
               for i, e in enumerate(eig)}
    pts = pd.DataFrame({"name": list(entries), "at": 4, "of": 4, "forgetting": [0.1, 0.2, 0.3, 0.4, 0.5]})
    from cfsam.analysis.study import Study

    monkeypatch.setattr(frontier, "measures", lambda study: pts)
    table = frontier.flatness_vs_forgetting(Study("any", entries, pts[["name", "at", "of"]]))
    assert table.loc["SC", "runs"] == 5
    assert table.loc["Hessian top eigenvalue", "runs"] == 4
    assert table.loc["Hessian top eigenvalue", "Spearman rho"] == pytest.approx(1.0)
