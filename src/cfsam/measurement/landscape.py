"""Loss landscapes: filter-normalised random directions, 2-D surfaces and 1-D interpolations, restored bit-exactly."""
from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cfsam.core.errors import UsageError
from cfsam.core.flatness import flatness_metrics
from cfsam.measurement.heldout import (
    Batch,
    LossFn,
    evaluating,
    loss_and_count,
    model_params,
    on_device,
    response_token_loss,
)

log = logging.getLogger(__name__)


METRICS = ("SC", "AG", "MAG")








def _seed(*keys: int) -> int:
    """A 64-bit seed from integer keys (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def random_direction(model: torch.nn.Module, seed: int, *, which: int = 0, filter_norm: bool = True,
                     ignore_1d: bool = True) -> list[torch.Tensor]:
    """Gaussian direction number ``which`` of ``seed``: one tensor per parameter, same dtype and device.

    Each parameter's entries come from its own CPU generator seeded by (seed, which, parameter
    index), so a seed gives the same direction on any device, whatever the options, and the
    parameters can be drawn in parallel threads (torch releases the GIL).

    filter_norm: scale each output row of a >=2-D parameter to the norm of the same row of theta
    (Li et al. 2018), so the step is relative to each row's size. ignore_1d: zero the direction of
    1-D parameters (norm weights, biases); otherwise keep it, filter-normalised as a single row.
    (Li et al.'s code copies theta into kept 1-D directions instead; we keep them random.)
    """
    def draw(k: int, p: torch.Tensor) -> torch.Tensor:
        if p.dim() <= 1 and ignore_1d:
            return torch.zeros_like(p)
        generator = torch.Generator().manual_seed(_seed(seed, which, k))
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        if filter_norm:
            rows = d.view(p.shape[0] if p.dim() > 1 else 1, -1)  # a 1-D parameter is one row
            w_rows = p.detach().reshape(rows.shape)
            rows.mul_(w_rows.norm(dim=1, keepdim=True) / (rows.norm(dim=1, keepdim=True) + 1e-10))
        return d

    params = model_params(model)
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        return list(pool.map(draw, range(len(params)), params))


class _Saved:
    """Save/load for a dataclass: numpy fields to ``<stem>.npz``, the rest to ``<stem>.json``, atomically."""

    @staticmethod
    def _stem(path) -> Path:
        path = Path(path)
        return path.with_suffix("") if path.suffix in (".npz", ".json") else path

    def save(self, path) -> Path:
        stem = self._stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in arrays}
        meta["kind"] = type(self).__name__
        for suffix, write in ((".npz", lambda f: np.savez(f, **arrays)),
                              (".json", lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode()))):
            final = stem.with_name(stem.name + suffix)
            tmp = final.with_name(final.name + ".tmp")
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, final)
        return stem

    @classmethod
    def load(cls, path):
        stem = cls._stem(path)
        meta = json.loads(stem.with_name(stem.name + ".json").read_text())
        if meta.pop("kind", None) != cls.__name__:
            raise UsageError(f"{stem}.json does not hold a {cls.__name__}")
        with np.load(stem.with_name(stem.name + ".npz")) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(**arrays, **meta)


@dataclass
class Surface(_Saved):
    """losses[i, j] = L(theta0 + x[i] d1 + y[j] d2); d1, d2 = ``random_direction(seed, which=0 / 1)``."""
    x: np.ndarray
    y: np.ndarray
    losses: np.ndarray
    seed: int
    settings: dict = field(default_factory=dict)  # span, n, filter_norm, ignore_1d
    model: dict = field(default_factory=dict)  # name, source, weights hash, dtype
    data: dict = field(default_factory=dict)  # dataset, split, examples, tokens

    @property
    def spacing(self) -> float:
        return float((self.x[-1] - self.x[0]) / (len(self.x) - 1))

    @property
    def center_loss(self) -> float:
        """L(theta0): the grid's centre (N is odd, so theta0 is a grid point)."""
        return float(self.losses[len(self.x) // 2, len(self.y) // 2])

    def flatness(self) -> dict[str, float]:
        return flatness_metrics(self.losses, self.spacing)


@dataclass
class Line(_Saved):
    """losses[k] = L((1 - t[k]) theta_a + t[k] theta_b)."""
    t: np.ndarray
    losses: np.ndarray
    model_a: dict = field(default_factory=dict)
    model_b: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)


def surface(model: torch.nn.Module, batches: Sequence[Batch], *, n: int = 11, span: float = 0.2, seed: int = 0,
            filter_norm: bool = True, ignore_1d: bool = True, loss_fn: LossFn = response_token_loss,
            model_info: dict | None = None, data_info: dict | None = None, progress: bool = True) -> Surface:
    """The loss on an n x n grid over [-span, span]^2 around the model's weights (restored exactly after)."""
    if not (isinstance(n, int) and n >= 3 and n % 2 == 1):
        raise UsageError(f"n={n!r}; the grid needs an odd number of points >= 3 so theta0 is its centre")
    if not (math.isfinite(span) and span > 0):
        raise UsageError(f"span={span!r}; it must be a positive finite number")
    params = model_params(model)
    batches = on_device(batches, params[0].device)
    d1 = random_direction(model, seed, which=0, filter_norm=filter_norm, ignore_1d=ignore_1d)
    d2 = random_direction(model, seed, which=1, filter_norm=filter_norm, ignore_1d=ignore_1d)
    axis = np.linspace(-span, span, n)
    axis[n // 2] = 0.0
    losses = np.empty((n, n))
    bar = tqdm(total=n * n, desc=f"surface seed {seed}", disable=not progress, leave=False)
    with evaluating(model) as theta0, torch.inference_mode():
        row = [torch.empty_like(p) for p in params]
        for i, a in enumerate(axis):
            for r, t, d in zip(row, theta0, d1):  # theta0 + a d1, once per grid row
                torch.add(t, d, alpha=float(a), out=r)
            for j, b in enumerate(axis):
                for p, r, d in zip(params, row, d2):  # one pass over the weights per grid point
                    torch.add(r, d, alpha=float(b), out=p)
                losses[i, j], items = loss_and_count(model, batches, loss_fn)
                bar.update()
        del row
    bar.close()
    del d1, d2
    settings = {"n": n, "span": float(span), "filter_norm": filter_norm, "ignore_1d": ignore_1d}
    data_info = {"items": items, "batches": len(batches), **(data_info or {})}
    return Surface(axis.copy(), axis.copy(), losses, seed, settings, dict(model_info or {}), data_info)


def summarize_flatness(surfaces: Sequence[Surface]) -> dict[str, dict]:
    """Per metric: mean, std (ddof=1; None for a single surface), the per-seed values and their seeds."""
    if not surfaces:
        raise UsageError("no surfaces to summarise")
    per_seed = [s.flatness() for s in surfaces]
    out = {}
    for m in METRICS:
        values = np.array([p[m] for p in per_seed])
        out[m] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                  "values": values.tolist(), "seeds": [s.seed for s in surfaces]}
    return out


def flatness_over_seeds(model: torch.nn.Module, batches: Sequence[Batch], seeds: Sequence[int] = (0, 1, 2),
                        **surface_kwargs) -> tuple[list[Surface], dict[str, dict]]:
    """One surface per direction seed, and the flatness metrics' mean and std over them."""
    if not seeds:
        raise UsageError("seeds is empty; give at least one direction seed")
    surfaces = [surface(model, batches, seed=s, **surface_kwargs) for s in seeds]
    return surfaces, summarize_flatness(surfaces)


def flatness_of(model: torch.nn.Module, batches: Sequence[Batch], spec: dict) -> tuple[list[Surface], dict[str, dict]]:
    """``flatness_over_seeds`` as a preset's ``landscape`` spec says: its direction ``seeds``, a ``grid`` x
    ``grid`` surface over ``span``, ``filter_norm`` (the one place its keys become this module's arguments)."""
    return flatness_over_seeds(model, batches, seeds=spec["seeds"], n=spec["grid"], span=spec["span"],
                               filter_norm=spec["filter_norm"])


def interpolate(model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Sequence[Batch], *,
                t: Sequence[float] | int = 11, loss_fn: LossFn = response_token_loss,
                model_info_a: dict | None = None, model_info_b: dict | None = None,
                data_info: dict | None = None, progress: bool = True) -> Line:
    """L((1-t) theta_a + t theta_b) for t in ``t`` (an int n means n points over [0, 1]).

    model_a's weights are moved along the line and restored; model_b is only read. torch.lerp is
    exact at t = 0 and t = 1, so the endpoints are the two models' own losses.
    """
    ts = np.linspace(0.0, 1.0, t) if isinstance(t, int) else np.asarray(t, dtype=np.float64)
    if ts.ndim != 1 or len(ts) < 2:
        raise UsageError(f"t={t!r}; give at least 2 interpolation points (or their number)")
    names_a = [(k, p.shape) for k, p in model_a.named_parameters()]
    names_b = [(k, p.shape) for k, p in model_b.named_parameters()]
    if names_a != names_b:
        diff = sorted(set(names_a) ^ set(names_b))[:3]
        raise UsageError(f"the two models' parameters differ (names or shapes), e.g. {diff}; "
                         "interpolation needs the same architecture")
    params_a = model_params(model_a)
    theta_b = [q.detach().to(device=p.device, dtype=p.dtype) for p, q in zip(params_a, model_params(model_b))]
    batches = on_device(batches, params_a[0].device)
    losses = np.empty(len(ts))
    with evaluating(model_a) as theta_a, torch.inference_mode():
        for k, tk in enumerate(tqdm(ts, desc="interpolation", disable=not progress, leave=False)):
            torch._foreach_copy_(params_a, theta_a)
            torch._foreach_lerp_(params_a, theta_b, float(tk))
            losses[k], items = loss_and_count(model_a, batches, loss_fn)
    data_info = {"items": items, "batches": len(batches), **(data_info or {})}
    return Line(ts, losses, dict(model_info_a or {}), dict(model_info_b or {}), data_info)
