"""Flatness of a 2-D loss surface: the paper's SC, AG and MAG (Appendix A.3, Eqs. 3-6).

Input: an N x N array ``Z`` of losses on a square grid, ``Z[i, j] = f(x_i, y_j)``, with the same step
``h = spacing`` along both axes (as produced by ``cfsam.measurement.landscape``). numpy only.

The paper's equations leave open how derivatives are discretised, which points enter each mean,
and what Eq. 5 averages (a sum of gradient *vectors* is not a flatness number). Our reading, fixed
here once so every table uses the same numbers:

* ``SC`` (Eqs. 3-4, surface curvature): the mean over *interior* points of ``|f_xx + f_yy|``, with
  central second differences ``f_xx = (Z[i+1,j] - 2 Z[i,j] + Z[i-1,j]) / h^2`` (likewise along j).
  Eq. 4 averages over all N^2 points; central differences exist only at the (N-2)^2 interior ones.
* ``AG`` (Eq. 5, average gradient): the mean over interior points of the gradient *norm*
  ``sqrt(f_x^2 + f_y^2)``, with central differences ``f_x = (Z[i+1,j] - Z[i-1,j]) / (2h)``.
  Averaging the signed vectors would let slopes on opposite sides of a minimum cancel.
* ``MAG`` (Eq. 6, mean absolute gradient): the mean of ``|t_i - t_{i-1}|`` over every pair of grid
  neighbours along both axes (2 N (N-1) pairs, no wrap-around), *not* divided by h, as Eq. 6 writes
  it. It therefore depends on the grid step, unlike AG.

The paper prints the three as percentages of an unstated scale; we report the raw values, so only
rankings and ratios between models are comparable with its Table 1.
"""
from __future__ import annotations

import numpy as np

from cfsam.core.errors import UsageError


def flatness_metrics(Z, spacing: float) -> dict[str, float]:
    """SC, AG and MAG of a grid of losses with step ``spacing`` (definitions in the module docstring)."""
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2 or min(Z.shape) < 3:
        raise UsageError(f"Z must be a 2-D grid of at least 3 x 3 losses; got shape {Z.shape}")
    if not np.all(np.isfinite(Z)):
        raise UsageError(f"Z holds {int((~np.isfinite(Z)).sum())} non-finite losses; flatness needs finite values")
    h = float(spacing)
    if not (np.isfinite(h) and h > 0):
        raise UsageError(f"spacing={spacing!r}; it must be a positive finite grid step")

    c = Z[1:-1, 1:-1]  # interior points
    f_xx = (Z[2:, 1:-1] - 2 * c + Z[:-2, 1:-1]) / h**2
    f_yy = (Z[1:-1, 2:] - 2 * c + Z[1:-1, :-2]) / h**2
    f_x = (Z[2:, 1:-1] - Z[:-2, 1:-1]) / (2 * h)
    f_y = (Z[1:-1, 2:] - Z[1:-1, :-2]) / (2 * h)
    steps = np.concatenate([np.abs(np.diff(Z, axis=0)).ravel(), np.abs(np.diff(Z, axis=1)).ravel()])
    return {
        "SC": float(np.mean(np.abs(f_xx + f_yy))),
        "AG": float(np.mean(np.hypot(f_x, f_y))),
        "MAG": float(np.mean(steps)),
    }
