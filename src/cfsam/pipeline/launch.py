"""``cfsam batch``: its options and what it runs, notebooks locally (``batch``) or as Slurm jobs (``slurm``).

Apart from both so that neither imports the other: ``slurm`` builds on ``batch``'s notebook parameters.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from cfsam.core.errors import RunFailed, UsageError
from cfsam.pipeline import slurm
from cfsam.pipeline.batch import run_local
from cfsam.pipeline.presets import is_path


def add_arguments(p) -> None:
    """The options of ``cfsam batch`` (registered by ``cfsam.cli``)."""
    p.add_argument("--preset", default="cpu")
    p.add_argument("--notebooks", help="comma-separated chapter names (default: every chapter of _toc.yml)")
    p.add_argument("--out", type=Path, help="output directory (default: _build/batch/<preset>/)")
    p.add_argument("--notebooks-dir", type=Path, help="where the notebooks are (default: notebooks/)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="extra notebook parameter, VALUE read as YAML (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would run (with --slurm: the job graph and the scripts) and stop")
    p.add_argument("--no-compute", dest="compute", action="store_false",
                   help="never train or measure: execute the notebooks from the results cache as it is")
    s = p.add_argument_group("Slurm")
    s.add_argument("--slurm", action="store_true",
                   help="write sbatch scripts along the experiment graph (one job per run, chained with "
                        "afterok, then one light job for the chapters) instead of running")
    s.add_argument("--slurm-config", type=Path, help="header defaults and env setup (default: configs/slurm.yaml)")
    s.add_argument("--partition")
    s.add_argument("--gpus", type=int, help="GPUs per node (= training processes)")
    s.add_argument("--time", help="wall-time limit, e.g. 12:00:00")
    s.add_argument("--accelerate", help=f"{' | '.join(slurm.ACCELERATE_CONFIGS)} or a config path (default from the "
                                        f"Slurm config)")
    s.add_argument("--submit", action="store_true", help="submit the scripts with sbatch")


def _parse_params(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(f"parameter {item!r} must be NAME=VALUE with NAME a Python identifier")
        out[name] = yaml.safe_load(value)
    return out


def main(args) -> int:
    notebooks = args.notebooks.split(",") if args.notebooks else None
    params = _parse_params(args.param)
    if is_path(args.preset):  # absolute: the notebooks run in their own folder, the Slurm jobs in the repository
        args.preset = str(Path(args.preset).expanduser().resolve())
    if not args.slurm:
        run_local(args.preset, notebooks, out=args.out, notebooks_dir=args.notebooks_dir, dry_run=args.dry_run,
                  parameters=params, compute=args.compute)
        return 0
    if not args.compute:
        raise UsageError("--no-compute is for local runs; the Slurm chapters job uses it by itself")
    if args.submit and not args.dry_run and shutil.which("sbatch") is None:
        raise RunFailed("--submit: sbatch is not on PATH; write the scripts without --submit and run "
                           "submit_all.sh on the cluster")
    overrides = {"partition": args.partition, "gpus_per_node": args.gpus, "time": args.time,
                 "accelerate": args.accelerate}
    scripts = slurm.write_slurm(args.preset, notebooks, out=args.out, notebooks_dir=args.notebooks_dir,
                          config=args.slurm_config, overrides=overrides, parameters=params, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    if args.submit:
        slurm.submit(scripts)
    else:
        print(f"{len(scripts)} sbatch scripts in {scripts[0].parent} (the job graph: jobs.txt); submit them, with "
              f"their dependencies, with:\n  bash {scripts[0].parent / 'submit_all.sh'}")
    return 0
