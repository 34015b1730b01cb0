"""Figure helpers shared by the notebooks: each function takes plain results and returns a Figure.

Nothing here imports the rest of cfsam: a loss surface is anything with ``x``, ``y`` and ``losses``
(``losses[i, j]`` at ``(x[i], y[j])``, as ``cfsam.measurement.landscape.Surface``), a line anything with ``t``
and ``losses``. Models that are compared share one colour scale (``shared_norm``), so equal colours
mean equal losses across panels, as the paper's Figure 1 needs to be read.

Add new helpers as further functions in their own section; keep them free of global style changes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from cfsam.core.errors import UsageError


# --------------------------------------------------------------------------------------- common
def save_figure(fig: Figure, path, *, dpi: int = 150, close: bool = False) -> Path:
    """Write a figure atomically (format from the suffix: png, pdf, svg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
    if close:
        plt.close(fig)
    return path


def shared_norm(arrays, vmin: float | None = None, vmax: float | None = None) -> Normalize:
    """One colour scale over several arrays (their joint min and max unless given)."""
    finite = [np.asarray(a, dtype=float)[np.isfinite(a)] for a in arrays]
    finite = [a for a in finite if a.size]
    if not finite and (vmin is None or vmax is None):
        raise UsageError("no finite values to scale colours by")
    lo = min(float(a.min()) for a in finite) if vmin is None else vmin
    hi = max(float(a.max()) for a in finite) if vmax is None else vmax
    if hi <= lo:
        hi = lo + 1e-12  # a constant surface still gets a valid scale
    return Normalize(vmin=lo, vmax=hi)


def _panels(n: int, *, width: float, height: float, **subplot_kw):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, subplot_kw=subplot_kw)
    return fig, list(axes[0])


# ------------------------------------------------------------------------------ loss landscapes
def contour_grid(surfaces: Mapping[str, object], *, levels: int = 20, cmap: str = "viridis",
                 vmin: float | None = None, vmax: float | None = None, labels: bool = True) -> Figure:
    """Filled contours with contour lines, one panel per model, one shared colour scale and levels."""
    if not surfaces:
        raise UsageError("no surfaces to plot")
    norm = shared_norm([s.losses for s in surfaces.values()], vmin, vmax)
    ticks = np.linspace(norm.vmin, norm.vmax, levels)
    fig, axes = _panels(len(surfaces), width=4.2, height=3.8)
    for ax, (name, s) in zip(axes, surfaces.items()):
        X, Y = np.meshgrid(s.x, s.y, indexing="ij")
        filled = ax.contourf(X, Y, s.losses, levels=ticks, cmap=cmap, norm=norm, extend="both")
        lines = ax.contour(X, Y, s.losses, levels=ticks, colors="k", linewidths=0.5)
        if labels:
            ax.clabel(lines, lines.levels[::4], fontsize=6, fmt="%.2f")
        ax.plot([0], [0], marker="+", color="w", markersize=10)  # theta0
        ax.set(title=name, xlabel=r"$\alpha$", ylabel=r"$\beta$", aspect="equal")
    fig.colorbar(filled, ax=axes, label="loss", shrink=0.85, format="%.3g")
    return fig


def surface_grid(surfaces: Mapping[str, object], *, cmap: str = "viridis", vmin: float | None = None,
                 vmax: float | None = None, elev: float = 30, azim: float = -60, floor_contours: int = 15) -> Figure:
    """3-D surfaces (the paper's Fig. 1) with contours projected on the floor; shared colours and z-range."""
    if not surfaces:
        raise UsageError("no surfaces to plot")
    norm = shared_norm([s.losses for s in surfaces.values()], vmin, vmax)
    floor = norm.vmin - 0.3 * (norm.vmax - norm.vmin)  # contours drawn below the surface, not through it
    fig, axes = _panels(len(surfaces), width=4.5, height=4.2, projection="3d")
    for ax, (name, s) in zip(axes, surfaces.items()):
        X, Y = np.meshgrid(s.x, s.y, indexing="ij")
        Z = np.clip(s.losses, norm.vmin, norm.vmax)  # a shared z-range: clip what lies outside it
        ax.plot_surface(X, Y, Z, cmap=cmap, norm=norm, rstride=1, cstride=1, linewidth=0.2, edgecolor="k",
                        alpha=0.9)
        ax.contour(X, Y, Z, levels=floor_contours, zdir="z", offset=floor, cmap=cmap, norm=norm)
        ax.set(title=name, xlabel=r"$\alpha$", ylabel=r"$\beta$", zlim=(floor, norm.vmax))
        ax.view_init(elev=elev, azim=azim)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="loss", shrink=0.6, pad=0.12,
                 format="%.3g")
    return fig


def line_plot(lines: Mapping[str, object], *, xlabel: str = "t (0: start model, 1: end model)") -> Figure:
    """1-D interpolation curves, one per entry, on one axis."""
    if not lines:
        raise UsageError("no lines to plot")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, line in lines.items():
        ax.plot(line.t, line.losses, marker="o", markersize=3, label=name)
    ax.set(xlabel=xlabel, ylabel="loss")
    ax.legend()
    return fig


# ----------------------------------------------------------------------- learning vs forgetting
def learning_vs_forgetting(table, *, x: str = "learned (Δ own held-out loss)",
                           y: str = "forgot (Δ Alpaca held-out loss)") -> Figure:
    """One point per stage-2 run: what it learned (x, negative is learning) against what it forgot (y),
    coloured by optimizer and labelled with rho; the ideal run sits at the lower left."""
    import seaborn as sns

    df = table.reset_index()
    df["run"] = [f"{o}" + ("" if r != r or r is None else f" ρ={r:g}" + (" (A)" if a else ""))
                 for o, r, a in zip(df["optimizer"], df["rho"], df["adaptive"])]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sns.scatterplot(data=df, x=x, y=y, hue="optimizer", style="method", s=70, ax=ax)
    for _, row in df.iterrows():
        ax.annotate(row["run"], (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_title("learning vs forgetting per stage-2 run")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- frontiers
def frontier(points, curves: Mapping[tuple, tuple] | None = None, levels: Mapping[str, float] | None = None,
             *, columns: int = 2) -> Figure:
    """Learning (x) against forgetting (y), one panel per stage-2 set (``columns`` a row, each large enough to
    read at page width), one colour per method family; ``curves`` maps (dataset, family, seed) to a Pareto
    front (x, y), drawn as lines; ``levels`` maps a set to the learning level its verdicts are read at (a
    dashed line). The legend sits outside the data, below the panels."""
    sets = list(dict.fromkeys(points["dataset"]))
    rows = -(-len(sets) // columns)
    cols = min(columns, len(sets))
    fig, grid = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.4 * rows), squeeze=False)
    axes = list(grid.ravel())
    families = list(dict.fromkeys(points["family"]))
    colours = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(families)}
    for ax, ds in zip(axes, sets):
        sub = points[points["dataset"] == ds]
        for fam in families:
            g = sub[sub["family"] == fam]
            ax.scatter(g["learning"], g["forgetting"], s=18, color=colours[fam], label=fam, alpha=0.8)
        for (cds, fam, _seed), (cx, cy) in (curves or {}).items():
            if cds == ds and fam in colours:
                ax.plot(cx, cy, color=colours[fam], lw=1.2, alpha=0.7)
        if levels and ds in levels and levels[ds] == levels[ds]:
            ax.axvline(levels[ds], color="black", lw=1.0, ls="--", label="verdict's learning level")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set(title=ds, xlabel="learning (fall of own held-out loss, nats)",
               ylabel="forgetting (rise of held-out Alpaca loss, nats)")
        # runs that unlearn far would squeeze the fronts into a corner: show them as a count at the left edge
        most = sub["learning"].max()
        left = -0.25 * most if most > 0 else None
        beyond = int((sub["learning"] < left).sum()) if left is not None else 0
        if beyond:
            ax.set_xlim(left=left * 1.05)
            ax.text(0.01, 0.99, f"{beyond} point{'s' if beyond > 1 else ''} further left (own loss rose)",
                    transform=ax.transAxes, va="top", fontsize=8)
    for ax in axes[len(sets):]:
        ax.set_visible(False)
    handles = {lab: h for ax in axes[:len(sets)] for h, lab in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 4), frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) > 4), 1, 1))
    return fig
