"""The ``cfsam`` command: every subcommand is registered here, each a thin call into the library.

    info            presets, models, datasets and whether each is available here
    prepare-model   convert an embedded GGUF model to a cached safetensors directory
    train           train one stage (a stage spec from a preset, the flags, or both)
    merge           Wise-FT of two trained stages
    eval            the eval suite on one model
    measure         a preset's measurements (held-out losses, eval, landscape) on one model
    run-missing     compute what the results cache lacks for a preset
    status          every experiment of a preset: ok, stale (why), missing, damaged
    doctor          the same, checking every entry and file, never stopping at the first bad one
    batch           chapters through papermill, locally or as Slurm jobs along the experiment graph
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cfsam.core.errors import CfsamError, UsageError
from cfsam.training.config import CHOICES, DEFAULT_REHEARSAL_FRACTION, DEFAULTS, HELP, TYPES


# ------------------------------------------------------------------------------------ commands
def cmd_info(args) -> int:
    from cfsam.data import models, sources
    from cfsam.pipeline import presets

    print("Presets:")
    for name in presets.preset_names():
        try:
            print(f"  {name:14s} {presets.load_preset(name)['description']}")
        except presets.PresetError as err:
            print(f"  {name:14s} INVALID: {err}")
    print("\nModels:")
    for name in models.model_names():
        print(f"  {name:14s} {models.availability(name)}")
    print(f"\nDatasets (mirror: {sources.data_dir() or 'not set; CFSAM_DATA_DIR'}):")
    for name in sources.dataset_names():
        print(f"  {name:14s} [{sources.dataset_spec(name)['kind']:5s}] {sources.availability(name)}")
    return 0


def cmd_prepare_model(args) -> int:
    from cfsam.data import models

    print(models.prepare(args.model))
    return 0


def train_spec(args) -> dict:
    """The stage spec ``cfsam train`` runs: the preset's stage (with its parent), then the flags over it."""
    from cfsam.pipeline import presets, specs
    from cfsam.training.config import resolve

    flags = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    if args.preset:
        if args.stage is None:
            raise UsageError("--preset needs --stage 1 or --stage 2")
        p = presets.load_preset(args.preset)
        s1 = specs.stage1(p, args.model or p["model"]) if args.stage == 1 else specs.stage1(p, p["model"])
        if args.stage == 1:
            spec = {**s1, **({"dataset": args.dataset} if args.dataset else {})}
        else:
            sam = specs.sam(p) if flags.get("optimizer") == "sam" else {}
            spec = specs.stage2(p, args.model or s1, args.dataset or p["stage2_datasets"][0], **sam)
            if args.rehearsal:
                spec = {"rehearsal_from": p["stage1"]["dataset"], **p["rehearsal"], **spec}
    else:
        if args.model is None or args.dataset is None:
            raise UsageError("cfsam train needs --model (a preset or a stage-1 directory) and --dataset "
                             "(or --preset NAME --stage 1|2)")
        spec = {"model": args.model, "dataset": args.dataset}
    spec.update(flags)
    if (args.rehearsal or "rehearsal_from" in flags) and not spec.get("rehearsal_fraction"):
        spec["rehearsal_fraction"] = DEFAULT_REHEARSAL_FRACTION
    if spec.get("rehearsal_fraction") and spec.get("rehearsal_from") is None:
        spec["rehearsal_from"] = _trained_on(spec["model"])
    resolve(spec)  # every value checked before anything loads
    return spec


def _trained_on(model) -> str | None:
    """The set a stage directory was trained on, to replay it."""
    if isinstance(model, dict):
        return model.get("dataset")
    from cfsam.core.registry import model_dir

    folder = model_dir(model)  # a preset's name is the preset, never a folder that shares it
    metrics = folder / "metrics.json" if folder is not None else None
    return json.loads(metrics.read_text())["config"].get("dataset") if metrics and metrics.exists() else None


def cmd_train(args) -> int:
    from cfsam.training.stage import train_stage

    spec = train_spec(args)
    metrics = train_stage(**spec, out_dir=args.out)
    print(f"{metrics['out_dir']}\nrun {metrics['run_id']}: {len(metrics['steps'])} steps, final loss "
          f"{metrics['final_loss']:.4f}, {metrics['tokens_per_s']:.0f} tokens/s")
    return 0


def cmd_merge(args) -> int:
    from cfsam.training.merge import wise_ft

    print(wise_ft(args.stage1, args.stage2, args.out, alpha=args.alpha))
    return 0


def cmd_eval(args) -> int:
    import pandas as pd
    import torch

    from cfsam.core.dist import rank_world
    from cfsam.core.io import write_json_atomic
    from cfsam.data import models
    from cfsam.evaluation import tasks
    from cfsam.evaluation.harness import evaluate
    from cfsam.evaluation.metrics import summary_tables

    names = tasks.check_names([t.strip() for t in args.tasks.split(",") if t.strip()])  # fail before loading
    if not names:
        raise UsageError(f"--tasks {args.tasks!r} names no task; give task names, 'paper' (its 13 tasks) or 'all'")
    _check_device(args.device)
    loaded = models.load_model(args.model, dtype=getattr(torch, args.dtype))
    results = evaluate(loaded, names, limit=args.limit, seed=args.seed, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                       progress=True, device=args.device)
    if rank_world()[0] != 0:
        return 0
    if args.out:
        write_json_atomic(args.out, results)
    task_df, cat_df = summary_tables(results)
    with pd.option_context("display.max_colwidth", 60, "display.width", 200, "display.float_format", "{:.2f}".format):
        print(task_df.to_string(index=False), cat_df.to_string(index=False), sep="\n\n")
    t = results["timing"]
    if t["items"]:
        print(f"\n{t['items']} items in {t['seconds']:.1f} s ({t['items_per_s']:.1f} items/s)")
    return 0


def _check_device(device: str | None) -> None:
    """``--device`` names a device this machine has (before any model loads)."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {device!r} is not a device name ({err}); e.g. cpu, cuda, cuda:0") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            have = f"{count} CUDA device(s): cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise UsageError(f"--device {device!r}: this machine has {have}; allowed: cpu"
                             + (", cuda" if count else ""))


def cmd_measure(args) -> int:
    """A preset's measurements of one model: the same spec and code as ``run-missing``'s."""
    from cfsam.core.io import write_json_atomic
    from cfsam.pipeline import runner, specs

    spec = dict(specs.expand(args.preset)["stage1"]["measure"])  # stage 1's: held-out sets, eval, landscape
    keep = set(args.what.split(","))
    bad = keep - {"heldout", "eval", "landscape"}
    if bad:
        raise UsageError(f"--what {','.join(sorted(bad))}: allowed heldout, eval, landscape")
    if "eval" not in keep:
        spec["eval"] = {**spec["eval"], "tasks": []}
    if "landscape" not in keep:
        spec.pop("landscape", None)
    measured, _ = runner.measure(args.model, spec)
    if "heldout" not in keep:
        measured.pop("heldout_loss")
    write_json_atomic(args.out, {"model": args.model, "preset": args.preset, "measure": spec, **measured})
    summary = {k: v["loss"] for k, v in measured.get("heldout_loss", {}).items()}
    if "landscape" in measured:
        summary["flatness"] = {m: v["mean"] for m, v in measured["landscape"]["flatness"].items()}
    print(json.dumps(summary, indent=1), f"\nwritten to {args.out}")
    return 0


def cmd_run_missing(args) -> int:
    """Exit 0 unless an experiment failed that should have worked: one whose data or model cannot be had
    here is skipped with one line and counted in the summary, not an error."""
    from cfsam.pipeline import runner

    if args.dry_run:
        runner.run_missing(args.preset, _csv(args.notebooks), _csv(args.only), True, args.workers)
        return 0
    summary = runner.compute_missing(args.preset, _csv(args.notebooks), _csv(args.only), args.workers)
    if os.environ.get("RANK", "0") == "0":  # under a launcher: one summary, not one per rank
        print("\n".join(summary.lines()))
    return 1 if summary.failed else 0


def cmd_status(args) -> int:
    from cfsam.pipeline import cache

    rows = cache.check(args.preset)
    for r in rows:
        note = r["why"] or ("" if r["data_verified"] is not False else "data not verified here")
        print(f"{r['status']:8s} {r['name']:36s} {note}")
    bad = [r for r in rows if r["status"] not in ("ok",)]
    if args.check and bad:
        print(f"\n{len(bad)} of {len(rows)} not ok; recompute with:")
        for r in bad:
            if r["command"]:
                print(f"  {r['command']}")
    return 1 if args.check and any(r["status"] in ("damaged", "stale") for r in rows) else 0


def cmd_batch(args) -> int:
    from cfsam.pipeline import launch

    return launch.main(args)


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


# -------------------------------------------------------------------------------------- parser
def _add_train(sub) -> None:
    """``cfsam train``: every trainer option is a flag, generated from ``training.config.DEFAULTS``."""
    t = sub.add_parser("train", help="train one stage (stage 1: instruction tuning; stage 2: continue with AdamW or SAM)",
                       description="Train one stage. Options left out come from --preset/--stage, else from the "
                                   "trainer's defaults (cfsam.training.config.DEFAULTS). The model is cached in "
                                   "$CFSAM_CACHE/runs/<run id>, the same place run-missing uses. Multi-process: "
                                   "torchrun --nproc_per_node N -m cfsam train ... or accelerate launch "
                                   "--config_file configs/accelerate_fsdp.yaml -m cfsam train ...")
    t.add_argument("--preset", help="take the stage spec from a preset (smoke, cpu, paper)")
    t.add_argument("--stage", type=int, choices=(1, 2), help="which stage of --preset (2: from its stage 1)")
    t.add_argument("--model", help="a model preset, or a model directory (stage 2: a stage-1 output)")
    t.add_argument("--dataset", help="a training set (alpaca, sharegpt, open-platypus, metamathqa, auto-wiki, ...)")
    t.add_argument("--out", help="output directory (default: $CFSAM_CACHE/runs/<run id>)")
    for name, default in DEFAULTS.items():  # every trainer option, from the one place it is defined
        flag, hint = "--" + name.replace("_", "-"), HELP[name]
        if isinstance(default, bool):
            t.add_argument(flag, dest=name, action="store_true", default=None, help=hint)
        else:
            t.add_argument(flag, dest=name, type=TYPES.get(name, type(default)), choices=CHOICES.get(name),
                           help=hint)
    t.add_argument("--rehearsal", action="store_true",
                   help=f"mix stage-1 data into this stage (fraction: the preset's, else {DEFAULT_REHEARSAL_FRACTION})")
    t.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfsam", description="Catastrophic forgetting and SAM in LLM tuning")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="presets, models and datasets, and whether each is available here").set_defaults(
        func=cmd_info)
    p = sub.add_parser("prepare-model", help="convert an embedded GGUF model to a cached safetensors dir")
    p.add_argument("model", default="smollm2-135m", nargs="?")
    p.set_defaults(func=cmd_prepare_model)

    _add_train(sub)

    m = sub.add_parser("merge", help="Wise-FT: (1 - alpha) * stage 1 + alpha * stage 2")
    m.add_argument("stage1")
    m.add_argument("stage2")
    m.add_argument("--alpha", type=float, default=0.5)
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser("eval", help="evaluate a model on the paper's general-ability tasks")
    e.add_argument("--model", required=True, help="model preset or saved model directory")
    e.add_argument("--tasks", default="paper", help="comma-separated task names, 'paper' (its 13 tasks) or 'all'")
    e.add_argument("--limit", type=int, default=None, help="seeded subsample of N items per task")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--num-fewshot", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    e.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: the model's, or CUDA if present)")
    e.add_argument("--cache-dir", default=None, help="per-task result cache (default: $CFSAM_CACHE/eval)")
    e.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
    e.add_argument("--out", default=None, help="write the full results (per-item records included) as JSON")
    e.set_defaults(func=cmd_eval)

    me = sub.add_parser("measure", help="a preset's measurements (held-out losses, eval, landscape) of one model")
    me.add_argument("model", help="model preset or saved model directory")
    me.add_argument("--preset", default="cpu", help="whose measurement settings (its stage-1 experiment's)")
    me.add_argument("--what", default="heldout,landscape", help="comma-separated: heldout, eval, landscape")
    me.add_argument("--out", required=True, help="JSON file for the measurements")
    me.set_defaults(func=cmd_measure)

    r = sub.add_parser("run-missing", help="run the experiments of a preset that the cache lacks")
    r.add_argument("--preset", default="cpu")
    r.add_argument("--notebooks", help="comma-separated chapter names (default: all)")
    r.add_argument("--only", help="comma-separated experiment names")
    r.add_argument("--dry-run", action="store_true", help="list what would run")
    r.add_argument("--workers", type=int, default=1,
                   help="experiments side by side on this machine, one training run's each (e.g. 8 on one "
                        "large GPU; default 1)")
    r.set_defaults(func=cmd_run_missing)

    for name, check, hint in (("status", False, "cached, stale, damaged and missing experiments of a preset"),
                              ("doctor", True, "check every cached entry of a preset and say what to recompute")):
        s = sub.add_parser(name, help=hint)
        s.add_argument("--preset", default="cpu")
        if not check:
            s.add_argument("--check", action="store_true", help="exit 1 when an entry is damaged or stale")
        s.set_defaults(func=cmd_status, check=check)

    from cfsam.pipeline import batch, launch

    launch.add_arguments(sub.add_parser("batch", help="execute chapters with papermill, locally or as Slurm jobs",
                                        description=batch.__doc__.split("\n\n")[0]))
    sub.choices["batch"].set_defaults(func=cmd_batch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CfsamError, OSError) as err:
        # the package's errors name the bad value and what is allowed, and the machine's (a path, the disk)
        # name the file: show them without a traceback. Anything else is a bug and keeps its traceback.
        if args.verbose:
            raise
        print(f"cfsam {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
