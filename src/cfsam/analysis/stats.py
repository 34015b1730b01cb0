"""Exact permutation statistics for small samples: Spearman's rank correlation and its p-value.

The correlations of flatness with forgetting run over a few dozen independent end points at most; a p-value
from scipy's asymptotic formula is not to be trusted there, so these count pairings exactly where they can.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from cfsam.core.errors import UsageError


EXACT_SPEARMAN_MAX = 14  # the exact null below holds 2^n x n^3/3 counts: 119 MB at 14 points


@lru_cache(maxsize=None)
def spearman_null(n: int) -> np.ndarray:
    """The exact null distribution of Spearman's D = sum_i (i - pi(i))^2 over all n! pairings pi of n untied
    ranks: ``counts[D]``. A dynamic program over which ranks the first positions took (2^n states, not n!)."""
    if not 1 <= n <= EXACT_SPEARMAN_MAX:
        raise UsageError(f"exact Spearman null for n={n}: allowed 1..{EXACT_SPEARMAN_MAX}")
    top = n * (n * n - 1) // 3
    counts = np.zeros((1 << n, top + 1), dtype=np.int64)
    counts[0, 0] = 1
    for mask in range(1 << n):  # increasing: a state is complete before any state that adds a rank to it
        i, row = mask.bit_count(), counts[mask]
        for j in range(n):
            if not mask >> j & 1:
                d = (i - j) ** 2
                counts[mask | 1 << j, d:] += row[:top + 1 - d]
    return counts[-1]


def permutation_spearman(x, y, *, n_resamples: int = 100_000, seed: int = 0) -> tuple[float, float, str]:
    """Spearman's rho and its two-sided permutation p-value (scipy's convention: twice the smaller tail):
    exact over every pairing up to 8 points, and up to ``EXACT_SPEARMAN_MAX`` without ties (from the exact
    null of D); else ``n_resamples`` random pairings (said in the third value)."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    n, rho = len(x), float(stats.spearmanr(x, y).statistic)
    untied = len(set(x)) == n and len(set(y)) == n
    if n > 8 and untied and n <= EXACT_SPEARMAN_MAX:
        null = spearman_null(n)
        d = int(round(float(((stats.rankdata(x) - stats.rankdata(y)) ** 2).sum())))
        greater, less = null[:d + 1].sum(), null[d:].sum()  # a small D is a large rho
        return rho, float(min(1.0, 2 * min(greater, less) / null.sum())), "exact"
    exact = n <= 8
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    yc = ry - ry.mean()

    def rho_of(a, axis=-1):  # Spearman's rho of each pairing: Pearson's r of the (average) ranks, all at once
        ac = np.moveaxis(a, axis, -1) - np.mean(a, axis=axis)[..., None]
        return (ac @ yc) / np.sqrt((ac ** 2).sum(axis=-1) * (yc ** 2).sum())

    res = stats.permutation_test((rx,), rho_of, vectorized=True, permutation_type="pairings",
                                 n_resamples=np.inf if exact else n_resamples, alternative="two-sided",
                                 random_state=seed)
    return rho, float(res.pvalue), "exact" if exact else f"{n_resamples} random pairings"


def within_ranks(values, groups) -> np.ndarray:
    """Each value's rank within its group, scaled to [-1/2, 1/2] (a group of one sits at 0): values of
    different groups are then comparable only by their place in their own group."""
    from scipy import stats

    values, groups = np.asarray(values, float), np.asarray(groups)
    out = np.zeros(len(values))
    for g in np.unique(groups):
        i = np.flatnonzero(groups == g)
        if len(i) > 1:
            out[i] = (stats.rankdata(values[i]) - 1) / (len(i) - 1) - 0.5
    return out


def within_r(x, y, groups) -> float:
    """Pearson's r of the within-group ranks of x and y (``within_ranks``; one group: Spearman's rho); NaN when
    no group has two runs with different values."""
    rx, ry = within_ranks(x, groups), within_ranks(y, groups)
    return float(np.corrcoef(rx, ry)[0, 1]) if rx.any() and ry.any() else np.nan


def stratified_spearman(x, y, groups, *, n_resamples: int = 20_000, seed: int = 0) -> tuple[float, float, str]:
    """A rank correlation pooled over groups without their levels (``within_r``), and its two-sided p-value
    from permuting y within each group (``n_resamples`` random permutations, the observed one among them)."""
    groups, y = np.asarray(groups), np.asarray(y, float)
    rho = within_r(x, y, groups)
    if np.isnan(rho):
        raise UsageError("no group has two runs with different values: a within-group correlation is undefined")
    rx, ry = within_ranks(x, groups), within_ranks(y, groups)  # permuting y within a group permutes its ranks
    rng, idx = np.random.default_rng(seed), [np.flatnonzero(groups == g) for g in np.unique(groups)]
    hits = 0
    for _ in range(n_resamples):
        perm = ry.copy()
        for i in idx:
            perm[i] = ry[rng.permutation(i)]
        hits += abs(float(np.corrcoef(rx, perm)[0, 1])) >= abs(rho) - 1e-12
    return rho, (hits + 1) / (n_resamples + 1), f"{n_resamples} permutations within groups"
