"""Presets: what to run and at which scale (``smoke`` | ``cpu`` | ``paper``), as YAML under registry/presets.

A preset speaks the trainer's vocabulary: ``train`` holds options shared by every stage, ``stage1`` and
``stage2`` the options of each stage, ``sam`` what a SAM run changes, ``rehearsal`` what a rehearsal run
changes; their keys are ``train_stage``'s (``cfsam.training.config.DEFAULTS``), validated by the trainer's
own check when the preset loads, so a bad value is named before anything runs. ``load_preset`` also
accepts a path to a YAML file of the same shape, and dotted overrides (``{"stage2.lr": 1e-4}``).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from cfsam.core import registry
from cfsam.core.registry import RegistryError
from cfsam.training import config as train_config

NUM = (int, float)
OPT_INT = (int, type(None))
STAGE = dict  # a mapping of trainer options, checked by the trainer's validation
# key -> type (or nested schema). Kept next to the loader so one glance tells what a preset holds.
SCHEMA = {
    "description": str,
    "model": str,
    "sizes": list,
    "train": STAGE,
    "stage1": STAGE,
    "stage2": STAGE,
    "stage2_datasets": list,
    "sam": STAGE,
    "rehearsal": STAGE,
    "wise_ft": {"alpha": NUM},
    "rho_sweep": list,
    "heldout": {"n": int},
    "eval": {"tasks": list, "limit": OPT_INT, "stratify": bool},
    "landscape": {"dataset": str, "grid": int, "span": NUM, "n_examples": int, "batch_size": int,
                  "seeds": list, "filter_norm": bool, "hessian_iters": int, "hutchinson_probes": int,
                  "disjoint": bool},
}
# keys a preset may leave out of their section (landscape.disjoint: true unless said; cpu-pilot says false)
MAY_OMIT = {"landscape.disjoint"}
# sections a preset may leave out
OPTIONAL = {
    "frontier": {"datasets": list, "full": int, "seeds": list, "epochs": NUM, "snapshots": int, "heldout_n": int,
                 "landscape": (dict, bool), "seeded": {"adamw_lr": list, "sam_rho": list, "asam_rho": list,
                                                               "rehearsal_fraction": list, "lr": list},
                 "screen": {"tasks": list, "limit": OPT_INT},
                 "eval": {"tasks": list, "limit": OPT_INT}, "adamw_lr": list, "sam_rho": list, "method_lr": list,
                 "asam_rho": list,
                 "rehearsal_fraction": list, "wise_ft_alpha": list, "light": {"adamw_lr": list, "sam_rho": list},
                 "complements": {"sam_rho": list, "rehearsal_fraction": list}, "short": {"runs": list},
                 "precision_check": {"runs": list, "precision": str}},
    # does a flatter start forget less? SAM stage-1 models at these radii, then AdamW stage 2 (specs.starts)
    "starts": {"sam_rho": list, "seeds": int, "seeded_lr": list},
    # how stage1.lr was chosen: stage 1 at these learning rates too, each measured as frontier-stage1 is
    "calibration": {"stage1_lr": list},
    # {size: preset}: a size trains as its own preset does (train, stage1, stage2, sam; specs.recipe), where the
    # lrs that suit this preset's model would not suit it; a size not named trains with this preset's recipe
    "size_recipes": dict,
}
# what a size takes from its recipe preset: how it trains, never what is measured
RECIPE = ("train", "stage1", "stage2", "sam")


class PresetError(RegistryError):
    """An unknown preset, key, model, dataset or task, or an impossible value."""


def preset_names() -> list[str]:
    return registry.names("presets")


def is_path(name_or_path: str | Path) -> bool:
    """Whether a preset argument is a YAML file's path (else a registered preset's name)."""
    return Path(name_or_path).suffix in (".yaml", ".yml")


def preset_name(name_or_path: str | Path) -> str:
    """The name a preset's results, locks and jobs are filed under (``results/<name>/``): a registered preset's
    name, or a YAML file's stem (``/abs/my.yaml`` -> ``my``), never the path itself."""
    return Path(name_or_path).stem if is_path(name_or_path) else str(name_or_path)


def registered_file(name: str) -> Path:
    return registry.ROOT / registry.KINDS["presets"][0] / f"{name}.yaml"


def load_preset(name_or_path: str | Path, overrides: dict | None = None) -> dict:
    name = preset_name(name_or_path)
    if is_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise PresetError(f"preset file {path} does not exist (a preset is one of {', '.join(preset_names())}, "
                              "or the path of a YAML file)")
        own = registered_file(name)
        if own.exists() and own.resolve() != path.resolve() and own.read_bytes() != path.read_bytes():
            # its results would go to results/<name>/, over the registered preset's
            raise PresetError(f"preset file {path} is named like the registered preset {name!r}, whose results "
                              f"are in results/{name}/; rename it (e.g. {name}-mine.yaml)")
    else:
        path = registered_file(name)
        if not path.exists():
            raise PresetError(f"unknown preset {name!r}; allowed: {', '.join(preset_names())} (or a YAML path)")
    try:
        preset = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise PresetError(f"preset file {path} is not valid YAML: {err}") from err
    if not isinstance(preset, dict):
        raise PresetError(f"preset file {path} must hold a mapping of keys, got {type(preset).__name__}")
    preset = copy.deepcopy(preset)
    for dotted, value in (overrides or {}).items():
        _set(preset, dotted, value)
    _resolve_precision(preset)
    _check(preset, {**SCHEMA, **{k: v for k, v in OPTIONAL.items() if k in preset}}, "")
    _check_values(preset)
    preset["name"] = name
    return preset


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not isinstance(tree.get(p), dict):
            raise PresetError(f"override {dotted!r}: {p!r} is not a section; sections: "
                              f"{', '.join(k for k, v in SCHEMA.items() if isinstance(v, dict) or v is STAGE)}")
        tree = tree[p]
    tree[leaf] = value


def _check(tree: dict, schema: dict, where: str) -> None:
    unknown = set(tree) - set(schema)
    if unknown:
        raise PresetError(f"unknown preset key(s) {', '.join(where + k for k in sorted(unknown))}; "
                          f"allowed{' in ' + where.rstrip('.') if where else ''}: {', '.join(schema)}")
    missing = {k for k in set(schema) - set(tree) if where + k not in MAY_OMIT}
    if missing:
        raise PresetError(f"preset is missing key(s) {', '.join(where + k for k in sorted(missing))}")
    for key, kind in schema.items():
        if key not in tree:
            continue
        value = tree[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise PresetError(f"preset key {where}{key} must be a mapping with keys {', '.join(kind)}")
            _check(value, kind, f"{where}{key}.")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise PresetError(f"preset key {where}{key}={value!r} must be {expected}")


def _stage_options(p: dict, section: str, **changes) -> None:
    """Check a section's options as the trainer reads them, with the trainer's own validation."""
    base = p["stage1"] if section == "stage1" else {**p["stage2"], **changes}
    spec = {"model": p["model"], **p["train"], **base}
    try:
        train_config.resolve(spec)
    except train_config.SpecError as err:
        raise PresetError(f"preset section {section}: {err}") from err


def _resolve_precision(p: dict) -> None:
    """``precision: auto`` (in train, stage1 or stage2) becomes the precision this machine trains in natively
    (``core.precision``): the value every run's spec and id then holds."""
    for section in ("train", "stage1", "stage2"):
        opts = p.get(section)
        if isinstance(opts, dict) and opts.get("precision") == "auto":
            from cfsam.core.precision import auto_precision

            opts["precision"] = auto_precision()


def _check_values(p: dict) -> None:
    def allowed(kind: str, values: list, key: str):
        names = registry.names(kind)
        bad = [v for v in values if v not in names]
        if bad:
            raise PresetError(f"preset key {key}: unknown {registry.KINDS[kind][1]} {', '.join(map(repr, bad))}; "
                              f"allowed: {', '.join(names)}")

    def positive(key: str, value, integer: bool = False):
        ok = isinstance(value, int if integer else NUM) and not isinstance(value, bool) and math.isfinite(value) \
            and value > 0
        if not ok:
            raise PresetError(f"preset key {key}={value!r} must be a {'positive integer' if integer else 'finite number > 0'}")

    allowed("models", [p["model"], *p["sizes"]], "model/sizes")
    allowed("datasets", [*p["stage2_datasets"], p["landscape"]["dataset"]], "stage2_datasets/landscape.dataset")
    allowed("tasks", p["eval"]["tasks"], "eval.tasks")
    if "dataset" not in p["stage1"]:
        raise PresetError("preset key stage1.dataset is missing (the instruction-tuning set, e.g. alpaca)")
    for section, forbidden in (("train", ("model", "dataset")), ("stage2", ("model", "dataset")),
                               ("sam", ("model", "dataset", "optimizer")),
                               ("rehearsal", ("model", "dataset", "rehearsal_from"))):
        bad = [k for k in forbidden if k in p[section]]
        if bad:
            raise PresetError(f"preset section {section} may not set {', '.join(bad)} (the experiments set it)")
    ds2 = p["stage2_datasets"][0] if p["stage2_datasets"] else p["stage1"]["dataset"]
    _stage_options(p, "stage1")
    _stage_options(p, "stage2", dataset=ds2)
    _stage_options(p, "sam", dataset=ds2, optimizer="sam", **p["sam"])
    _stage_options(p, "rehearsal", dataset=ds2, rehearsal_from=p["stage1"]["dataset"], **p["rehearsal"])
    for i, rho in enumerate(p["rho_sweep"]):
        positive(f"rho_sweep[{i}]", rho)
    if not 0.0 <= p["wise_ft"]["alpha"] <= 1.0:
        raise PresetError(f"wise_ft.alpha={p['wise_ft']['alpha']} must lie in [0, 1]")
    positive("heldout.n", p["heldout"]["n"], integer=True)
    if p["eval"]["limit"] is not None:
        positive("eval.limit", p["eval"]["limit"], integer=True)
    ls = p["landscape"]
    if ls["grid"] < 3 or ls["grid"] % 2 == 0:
        raise PresetError(f"landscape.grid={ls['grid']} must be an odd number >= 3 (SC needs the centre and "
                          "interior points)")
    positive("landscape.span", ls["span"])
    for key in ("n_examples", "batch_size", "hessian_iters"):
        positive(f"landscape.{key}", ls[key], integer=True)
    if ls["hutchinson_probes"] < 2:
        raise PresetError(f"landscape.hutchinson_probes={ls['hutchinson_probes']} must be >= 2 (its spread needs two)")
    if "frontier" in p:
        _check_frontier(p)
    if "starts" in p:
        _check_starts(p)
    if "calibration" in p:
        if "frontier" not in p:
            raise PresetError("preset key calibration needs a frontier: its stage-1 runs are measured as "
                              "frontier-stage1 is")
        for i, lr in enumerate(p["calibration"]["stage1_lr"]):
            positive(f"calibration.stage1_lr[{i}]", lr)
    if not ls["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) for s in ls["seeds"]):
        raise PresetError(f"landscape.seeds={ls['seeds']!r} must be a non-empty list of integers")
    if "size_recipes" in p:
        _check_size_recipes(p)


def _check_size_recipes(p: dict) -> None:
    """Each size named is one of ``sizes`` (not ``model``, whose recipe is the preset's own), and its recipe a
    registered preset of that model that names no recipes itself (so loading one never loops)."""
    others = [m for m in p["sizes"] if m != p["model"]]
    for size, name in p["size_recipes"].items():
        if size not in others:
            raise PresetError(f"preset key size_recipes.{size}: not one of the sizes other than model {p['model']!r}; "
                              f"allowed: {', '.join(others) or '(none)'}")
        if not isinstance(name, str) or name not in preset_names():
            raise PresetError(f"preset key size_recipes.{size}={name!r}: not a registered preset; allowed: "
                              f"{', '.join(preset_names())}")
        q = load_preset(name)
        if q["model"] != size:
            raise PresetError(f"preset key size_recipes.{size}={name!r}: that preset trains {q['model']!r}, not {size!r}")
        if "size_recipes" in q:
            raise PresetError(f"preset key size_recipes.{size}={name!r}: that preset names size_recipes itself; "
                              "a recipe must be the model's own")


def _check_starts(p: dict) -> None:
    st = p["starts"]
    if "frontier" not in p:
        raise PresetError("preset key starts needs a frontier: its stage-2 runs are the frontier's AdamW runs "
                          "from other starting points")
    f = p["frontier"]
    for i, rho in enumerate(st["sam_rho"]):
        if not (isinstance(rho, NUM) and not isinstance(rho, bool) and math.isfinite(rho) and rho > 0):
            raise PresetError(f"starts.sam_rho[{i}]={rho!r} must be a finite number > 0")
    if not 1 <= st["seeds"] <= len(f["seeds"]):
        raise PresetError(f"starts.seeds={st['seeds']!r} must be between 1 and the {len(f['seeds'])} of "
                          "frontier.seeds (the first that many)")
    extra = [v for v in st["seeded_lr"] if v not in f["adamw_lr"]]
    if extra:
        raise PresetError(f"starts.seeded_lr: {extra} are not in frontier.adamw_lr ({f['adamw_lr']})")


def _check_frontier(p: dict) -> None:
    f = p["frontier"]
    names = registry.names("datasets")
    bad = [d for d in f["datasets"] if d not in names]
    if bad or not f["datasets"]:
        raise PresetError(f"preset key frontier.datasets: unknown dataset {', '.join(map(repr, bad))} or none; "
                          f"allowed: {', '.join(names)}")
    if not 1 <= f["full"] <= len(f["datasets"]):
        raise PresetError(f"frontier.full={f['full']!r} must be between 1 and the number of frontier.datasets "
                          f"({len(f['datasets'])}): how many of them, from the first, get every seed and sweep")
    if f["snapshots"] < 4:
        raise PresetError(f"frontier.snapshots={f['snapshots']} must be >= 4 (learning and forgetting along the run)")
    if not f["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) for s in f["seeds"]):
        raise PresetError(f"frontier.seeds={f['seeds']!r} must be a non-empty list of integers")
    if f["heldout_n"] < 1 or (f["eval"]["limit"] is not None and f["eval"]["limit"] < 1):
        raise PresetError("frontier.heldout_n and frontier.eval.limit must be positive")
    allowed_tasks = registry.names("tasks")
    bad = [t for t in f["eval"]["tasks"] + f["screen"]["tasks"] if t not in allowed_tasks]
    if bad:
        raise PresetError(f"frontier.eval.tasks: unknown task {', '.join(map(repr, bad))}; allowed: "
                          f"{', '.join(allowed_tasks)}")
    if isinstance(f["landscape"], dict):
        unknown = set(f["landscape"]) - set(SCHEMA["landscape"])
        if unknown:
            raise PresetError(f"frontier.landscape: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                              f"{', '.join(SCHEMA['landscape'])} (or true/false)")
        ls = {**p["landscape"], **f["landscape"]}
        if ls["grid"] < 3 or ls["grid"] % 2 == 0 or not ls["seeds"]:
            raise PresetError(f"frontier.landscape: grid={ls['grid']} must be odd and >= 3, seeds non-empty")
    for key in ("adamw_lr", "sam_rho", "asam_rho", "rehearsal_fraction"):
        extra = [v for v in f["seeded"][key] if v not in f[key]]
        if extra:
            raise PresetError(f"frontier.seeded.{key}: {extra} are not in frontier.{key} ({f[key]})")
    for key in ("adamw_lr", "sam_rho", "method_lr", "asam_rho"):
        for i, v in enumerate(f[key] + (f["light"][key] if key in f["light"] else [])):
            if not (isinstance(v, NUM) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise PresetError(f"frontier.{key}[{i}]={v!r} must be a finite number > 0")
    # every method tuned alike: SAM, ASAM and rehearsal run at the stage-2 lr and at each of method_lr, which
    # together must be AdamW's grid (a comparison against another method's worst lr proves nothing)
    lr2 = p["stage2"].get("lr", train_config.DEFAULTS["lr"])
    if lr2 in f["method_lr"]:
        raise PresetError(f"frontier.method_lr: {lr2} is the stage-2 lr, at which every method already runs; "
                          "list only the grid's other learning rates")
    if sorted([lr2, *f["method_lr"]]) != sorted(f["adamw_lr"]):
        raise PresetError(f"frontier.method_lr={f['method_lr']} with the stage-2 lr {lr2} must be AdamW's grid "
                          f"frontier.adamw_lr={f['adamw_lr']}: every method is tuned over the same learning rates")
    extra = [v for v in f["seeded"]["lr"] if v not in f["adamw_lr"]]
    if extra:
        raise PresetError(f"frontier.seeded.lr: {extra} are not in frontier.adamw_lr ({f['adamw_lr']})")
    bad = [v for v in f["complements"]["sam_rho"] if v not in f["sam_rho"]]
    if bad:
        raise PresetError(f"frontier.complements.sam_rho: {bad} are not in frontier.sam_rho ({f['sam_rho']}): "
                          "rehearsal and Wise-FT with SAM build on SAM runs of the sweep")
    lrs = [""] + [f"-lr{lr:g}" for lr in f["method_lr"]]
    names = [f"adamw-lr{lr:g}" for lr in f["adamw_lr"]] + [f"{m}-rho{r:g}{t}" for m, rs in (
        ("sam", f["sam_rho"]), ("asam", f["asam_rho"])) for r in rs for t in lrs]
    for key in ("short", "precision_check"):
        bad = [r for r in f[key]["runs"] if r not in names]
        if bad:
            raise PresetError(f"frontier.{key}.runs: unknown run(s) {', '.join(map(repr, bad))}; "
                              f"allowed: {', '.join(names)}")
    other, trained = f["precision_check"]["precision"], p["train"].get("precision", train_config.DEFAULTS["precision"])
    if other not in train_config.PRECISIONS or (other == trained and f["precision_check"]["runs"]):
        allowed = [x for x in train_config.PRECISIONS if x != trained]
        raise PresetError(f"frontier.precision_check.precision={other!r}: allowed {', '.join(allowed)} (the runs "
                          f"train in {trained}; the check trains one of them in another precision)")
    for key, lo, hi in (("rehearsal_fraction", 0, 1), ("wise_ft_alpha", 0, 1)):
        for v in f[key] + (f["complements"]["rehearsal_fraction"] if key == "rehearsal_fraction" else []):
            if not (isinstance(v, NUM) and lo < v < hi):
                raise PresetError(f"frontier.{key} value {v!r} must lie in ({lo}, {hi})")
    limit = f["screen"]["limit"]  # the base model's screen reads at most this many items per task
    if limit is not None and limit < 1:  # an integer or null: the schema says so
        raise PresetError(f"frontier.screen.limit={limit!r} must be a positive integer, or null for every item")
