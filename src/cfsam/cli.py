"""The ``cfsam`` command. Each library module that has a subcommand registers it via ``add_cli``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands through add_cli(subparsers); a missing one is skipped.
SUBCOMMAND_MODULES = ["cfsam.train", "cfsam.merge", "cfsam.evaluate", "cfsam.landscape", "cfsam.experiments",
                      "cfsam.batch"]


def cmd_info(args) -> int:
    from cfsam import data, models, presets

    print("Presets:")
    for name in presets.preset_names():
        try:
            p = presets.load_preset(name)
            print(f"  {name:14s} {p['description']}")
        except presets.PresetError as err:
            print(f"  {name:14s} INVALID: {err}")
    print("\nModels:")
    for name in models.model_names():
        print(f"  {name:14s} {models.availability(name)}")
    print(f"\nDatasets (mirror: {data.data_dir() or 'not set; CFSAM_DATA_DIR'}):")
    for name in data.dataset_names():
        print(f"  {name:14s} [{data.dataset_spec(name)['kind']:5s}] {data.availability(name)}")
    return 0


def cmd_prepare_model(args) -> int:
    from cfsam import models

    print(models.prepare(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfsam", description="Catastrophic forgetting and SAM in LLM tuning")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="presets, models and datasets, and whether each is available here")
    info.set_defaults(func=cmd_info)
    prep = sub.add_parser("prepare-model", help="convert an embedded GGUF model to a cached safetensors dir")
    prep.add_argument("model", default="smollm2-135m", nargs="?")
    prep.set_defaults(func=cmd_prepare_model)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, RuntimeError, FileNotFoundError) as err:
        # library errors name the bad value and what is allowed: show them without a traceback
        if args.verbose:
            raise
        print(f"cfsam {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
