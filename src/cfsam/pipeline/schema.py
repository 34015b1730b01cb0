"""The results schema, once: what every ``results/<preset>/<name>.json.gz`` entry holds (written by the runner).

TypedDicts document the shape and let a type checker follow it; the JSON itself is plain.
"""
from __future__ import annotations

from typing import Any, TypedDict


class HeldoutLoss(TypedDict, total=False):
    loss: float            # mean response-token cross-entropy (nats) over the held-out examples
    n: int                 # examples
    label: str | None      # the data stand-in, when the set is a substitute
    per_example: list[list[float]]  # [summed loss, tokens] per example, for intervals over examples


class TaskResult(TypedDict, total=False):
    status: str            # ok | missing
    task: str
    category: str
    primary: str           # the task's metric: acc, acc_norm, ...
    score: float
    score_stderr: float | None
    n: int
    records: list[dict[str, Any]]  # per item: each choice's log-likelihood, the prediction, the gold answer


class Eval(TypedDict, total=False):
    tasks: dict[str, TaskResult]
    categories: dict[str, Any]     # the paper's categories and AVG (cfsam.evaluation.metrics.categories)
    timing: dict[str, Any]


class Landscape(TypedDict, total=False):
    flatness: dict[str, dict[str, float]]  # SC / AG / MAG: mean and std over direction seeds
    surfaces: list[dict[str, Any]]         # x, y, losses, seed, settings of each surface
    curvature: dict[str, float]            # Hessian top eigenvalue, Hutchinson trace, SAM sharpness


class Provenance(TypedDict, total=False):
    cfsam_version: str
    git_commit: str
    git_dirty: bool
    git_from: str                    # CFSAM_GIT_COMMIT: a staged copy's sender named the commit
    device_check: dict[str, Any]     # cfsam.measurement.selfcheck's result, where one was run first
    data: dict[str, dict[str, str]]  # sha256 of every data file read; checked where the data is present
    model_weights_hash: str | None
    machine: dict[str, Any]
    start: str
    end: str
    wall_s: float


class Entry(TypedDict, total=False):
    id: str                # cfsam.pipeline.specs.experiment_id: the spec's hash and the measurement version
    name: str
    preset: str
    spec: dict[str, Any]   # {"run": run spec (trainer vocabulary), "measure": what is measured}
    measure_version: int
    data_labels: dict[str, str | None]
    train: dict[str, Any] | None   # the stage's metrics.json: loss curve, norms, tokens/s, peak memory, run_id
    heldout_loss: dict[str, HeldoutLoss]
    eval: Eval
    landscape: Landscape
    measure_seconds: dict[str, float]  # wall time of each measurement
    provenance: Provenance
    migrated: dict[str, str]           # only on entries carried over to a new id scheme
