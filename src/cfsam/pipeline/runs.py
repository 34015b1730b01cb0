"""A run, the model an experiment measures, as one tagged type: a base model, a training stage (rehearsal is a
stage that replays stage-1 data), a snapshot saved along a stage, or a Wise-FT merge of two.

Specs and entries hold a run as a plain dict (``{"model": ...}``, a stage spec, ``{"snapshot": ...}``,
``{"wise_ft": ...}``); ``parse`` reads which kind it is, once, and each kind answers for itself: its id and
canonical form (which name its cached model and its results, so they must never change), the stages it
trains, its last stage, its parents and the base model it starts from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Union

from cfsam.core.io import config_hash
from cfsam.training import config as train_config


@dataclass(frozen=True)
class Base:
    """A model preset (or directory) as it is: nothing trained."""
    model: str
    kind: ClassVar[str] = "base"

    def id(self) -> str:
        return self.model

    def canonical(self) -> dict:
        return {"model": self.model}

    def stages(self) -> Iterator[dict]:
        return iter(())

    def last_stage(self) -> dict | None:
        return None

    def parents(self) -> list[dict]:
        return []

    def base_model(self) -> str:
        return self.model


@dataclass(frozen=True)
class Stage:
    """One training stage (``training.config``'s spec), from a model preset or from its parent stage."""
    spec: dict
    kind: ClassVar[str] = "stage"

    def id(self) -> str:
        return train_config.run_id(self.spec)

    def canonical(self) -> dict:
        return train_config.canonical(self.spec)

    def stages(self) -> Iterator[dict]:
        yield self.spec
        for parent in self.parents():
            yield from parse(parent).stages()

    def last_stage(self) -> dict:
        return train_config.resolve(self.spec)

    def parents(self) -> list[dict]:
        return [self.spec["model"]] if isinstance(self.spec["model"], dict) else []

    def base_model(self) -> str | None:
        return parse(self.spec["model"]).base_model() if self.parents() else self.spec["model"]


@dataclass(frozen=True)
class Snapshot:
    """The model saved at point ``at`` of ``of`` evenly spaced along a stage (``at == of``: its end); the
    stage trains with its snapshots, so the job that trains the stage is the one that makes it."""
    run: dict
    at: int
    of: int
    kind: ClassVar[str] = "snapshot"

    def id(self) -> str:
        return config_hash(self.canonical())

    def canonical(self) -> dict:
        return {"run": parse(self.run).id(), "at": self.at, "of": self.of}

    def stages(self) -> Iterator[dict]:
        return parse(self.run).stages()

    def last_stage(self) -> dict | None:
        return parse(self.run).last_stage()

    def parents(self) -> list[dict]:
        return parse(self.run).parents()

    def base_model(self) -> str | None:
        return parse(self.run).base_model()


@dataclass(frozen=True)
class WiseFT:
    """Wise-FT: ``(1 - alpha) * stage1 + alpha * stage2``, merged weight by weight."""
    stage1: dict
    stage2: dict
    alpha: float
    kind: ClassVar[str] = "wise_ft"

    def id(self) -> str:
        return train_config.merge_id({"run": parse(self.stage1).id()}, {"run": parse(self.stage2).id()}, self.alpha)

    def canonical(self) -> dict:
        return {"wise_ft": self.id()}

    def stages(self) -> Iterator[dict]:
        yield from parse(self.stage1).stages()
        yield from parse(self.stage2).stages()

    def last_stage(self) -> dict | None:
        return parse(self.stage2).last_stage()  # the tuned side

    def parents(self) -> list[dict]:
        return [self.stage1, self.stage2]

    def base_model(self) -> str | None:
        return parse(self.stage1).base_model()


Run = Union[Base, Stage, Snapshot, WiseFT]


def parse(run: dict) -> Run:
    """The kind of a run's dict form: the one place that reads it from the keys."""
    if "wise_ft" in run:
        w = run["wise_ft"]
        return WiseFT(w["stage1"], w["stage2"], w["alpha"])
    if "snapshot" in run:
        s = run["snapshot"]
        return Snapshot(s["run"], s["at"], s["of"])
    return Stage(run) if "dataset" in run else Base(run["model"])
