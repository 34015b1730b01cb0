"""Batch runs: compute what each notebook needs, then execute it with papermill, locally or on Slurm.

Locally, notebooks run one after the other: first the experiments a notebook still lacks
(``runner.run_missing``), then the notebook itself, into ``_build/batch/<preset>/<name>.ipynb``.
On a cluster, ``--slurm`` writes the jobs along the experiment graph (``cfsam.pipeline.slurm``): one job per run
(experiments measuring the same model share it), training and measuring it across its node's GPUs with
``accelerate launch ... run-missing --only``; one job for the base models; and last one light job (no GPU)
that renders the chapters with papermill from the cache (``cfsam batch --no-compute``). ``submit_all.sh``
submits them in topological order with ``--dependency=afterok``: stage 1, then its stage-2 runs side by side,
then the merges, then the chapters. ``--dry-run`` prints the graph and the scripts. The ``#SBATCH`` header
comes from ``configs/slurm.yaml`` with command-line overrides.

Notebooks are parameterised by papermill through a cell tagged ``parameters`` that declares at least
``preset`` and ``results_dir`` (None = the cache's default, ``cache.results_dir(preset)``).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from cfsam.pipeline import cache, chapters, runner
from cfsam.pipeline.presets import is_path, load_preset, preset_name

log = logging.getLogger(__name__)

REPO = cache.REPO
NOTEBOOKS_DIR = REPO / "notebooks"
KERNEL = "python3"
# Parameters every notebook's `parameters` cell must declare; checked before anything runs.
REQUIRED_PARAMETERS = ("preset", "results_dir")


def default_out(preset: str) -> Path:
    return REPO / "_build" / "batch" / preset_name(preset)


# ------------------------------------------------------------------------------- what to run
def select_notebooks(notebooks: list[str] | None = None, notebooks_dir: Path | None = None) -> list[str]:
    """The chapters to run, in book order: the named ones, or every chapter of _toc.yml."""
    nb_dir = Path(notebooks_dir or NOTEBOOKS_DIR)
    known = chapters.chapters(notebooks_dir, present=False)
    if notebooks is None:
        found = chapters.chapters(notebooks_dir)
        if not found:
            raise FileNotFoundError(f"no notebooks in {nb_dir} of the chapters of _toc.yml")
        return found
    bad = [nb for nb in notebooks if nb not in known]
    if bad:
        raise ValueError(f"unknown notebook(s) {', '.join(bad)}; allowed: {', '.join(known)}")
    absent = [nb for nb in notebooks if not (nb_dir / f"{nb}.ipynb").exists()]
    if absent:
        raise FileNotFoundError(f"notebook file(s) missing in {nb_dir}: {', '.join(nb + '.ipynb' for nb in absent)}")
    return [nb for nb in known if nb in notebooks]  # book order, no duplicates


def check_parameters(path: Path) -> None:
    """Fail early when a notebook lacks a `parameters` cell declaring the REQUIRED_PARAMETERS."""
    import papermill

    quiet = logging.getLogger("papermill")  # inspect_notebook logs every file it opens at INFO
    level, quiet.level = quiet.level, max(quiet.level, logging.WARNING)
    try:
        declared = papermill.inspect_notebook(str(path))
    finally:
        quiet.setLevel(level)
    lacking = [p for p in REQUIRED_PARAMETERS if p not in declared]
    if lacking:
        raise ValueError(f"notebook {path} does not declare parameter(s) {', '.join(lacking)} in a cell tagged "
                         f"'parameters' (declares: {', '.join(declared) or 'none'}); required: "
                         f"{', '.join(REQUIRED_PARAMETERS)}")


def notebook_parameters(preset: str, extra: dict | None = None) -> dict:
    if "preset" in (extra or {}):
        raise ValueError("the preset is set by --preset, not as an extra notebook parameter")
    return {"preset": preset, "results_dir": None, **(extra or {})}


def shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it (scripts `cd` there), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def papermill_command(notebook: Path, output: Path, parameters: dict) -> list[str]:
    """The `papermill` command line equivalent to the local run (None is passed as papermill's "None")."""
    cmd = ["papermill", shown(notebook), shown(output), "--cwd", shown(Path(notebook).parent), "-k", KERNEL]
    for name, value in parameters.items():
        # -p guesses types (None, True, ints, floats, else str); -y keeps anything else exact as YAML
        if value is None or isinstance(value, (bool, int, float, str)):
            cmd += ["-p", name, "None" if value is None else str(value)]
        else:
            cmd += ["-y", yaml.safe_dump({name: value}, default_flow_style=True).strip()]
    return cmd


# ------------------------------------------------------------------------------------- local
def run_local(preset: str, notebooks: list[str] | None = None, *, out: Path | None = None,
              notebooks_dir: Path | None = None, dry_run: bool = False, parameters: dict | None = None,
              compute: bool = True) -> list[Path]:
    """Per notebook, in sequence: run its missing experiments, then execute it into ``out``.

    With ``compute=False`` (``--no-compute``; the Slurm chapters job) nothing is trained or measured: the
    notebooks only read the results cache.

    Returns the executed notebooks' paths. A notebook that fails is kept as ``<name>.failed.ipynb`` (with
    the traceback in it); the others still run, and a RuntimeError names the failures at the end.
    """
    load_preset(preset)  # an unknown preset fails here, before anything runs
    nb_dir = Path(notebooks_dir or NOTEBOOKS_DIR).resolve()
    names = select_notebooks(notebooks, nb_dir)
    for nb in names:
        check_parameters(nb_dir / f"{nb}.ipynb")
    out = Path(out or default_out(preset)).resolve()
    params = notebook_parameters(preset, parameters)

    if dry_run:
        for nb in names:
            if compute:
                print(f"== {nb}: experiments still needed")
                runner.run_missing(preset, notebooks=[nb], dry_run=True)
            print(shlex.join(papermill_command(nb_dir / f"{nb}.ipynb", out / f"{nb}.ipynb", params)))
        return []

    import papermill

    out.mkdir(parents=True, exist_ok=True)
    done, failed = [], []
    for nb in tqdm(names, desc=f"notebooks ({preset})"):
        started = time.time()
        ran = runner.run_missing(preset, notebooks=[nb]) if compute else []
        target, partial = out / f"{nb}.ipynb", out / f".{nb}.partial.ipynb"
        try:
            # papermill saves as cells run: execute into a partial file, publish it whole when it succeeds
            papermill.execute_notebook(str(nb_dir / f"{nb}.ipynb"), str(partial), parameters=params,
                                       cwd=str(nb_dir), kernel_name=KERNEL, progress_bar=False)
        except papermill.PapermillExecutionError as err:
            os.replace(partial, out / f"{nb}.failed.ipynb")
            log.error("notebook %s failed in cell %s (%s): see %s", nb, err.exec_count, err.ename,
                      out / f"{nb}.failed.ipynb")
            failed.append(nb)
            continue
        os.replace(partial, target)
        (out / f"{nb}.failed.ipynb").unlink(missing_ok=True)
        log.info("notebook %s: %d experiments run, executed in %.0f s -> %s", nb, len(ran), time.time() - started,
                 target)
        done.append(target)
    if failed:
        raise RuntimeError(f"notebook(s) failed: {', '.join(failed)}; their outputs are {out}/<name>.failed.ipynb")
    return done


# --------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    from cfsam.pipeline import slurm

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
            raise ValueError(f"parameter {item!r} must be NAME=VALUE with NAME a Python identifier")
        out[name] = yaml.safe_load(value)
    return out


def main(args) -> int:
    from cfsam.pipeline import slurm

    notebooks = args.notebooks.split(",") if args.notebooks else None
    params = _parse_params(args.param)
    if is_path(args.preset):  # absolute: the notebooks run in their own folder, the Slurm jobs in the repository
        args.preset = str(Path(args.preset).expanduser().resolve())
    if not args.slurm:
        run_local(args.preset, notebooks, out=args.out, notebooks_dir=args.notebooks_dir, dry_run=args.dry_run,
                  parameters=params, compute=args.compute)
        return 0
    if not args.compute:
        raise ValueError("--no-compute is for local runs; the Slurm chapters job uses it by itself")
    if args.submit and not args.dry_run and shutil.which("sbatch") is None:
        raise RuntimeError("--submit: sbatch is not on PATH; write the scripts without --submit and run "
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
