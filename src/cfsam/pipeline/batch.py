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
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from cfsam.core.errors import RunFailed, UsageError
from cfsam.pipeline import cache, chapters, runner
from cfsam.pipeline.presets import load_preset, preset_name

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
        raise UsageError(f"unknown notebook(s) {', '.join(bad)}; allowed: {', '.join(known)}")
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
        raise UsageError(f"notebook {path} does not declare parameter(s) {', '.join(lacking)} in a cell tagged "
                         f"'parameters' (declares: {', '.join(declared) or 'none'}); required: "
                         f"{', '.join(REQUIRED_PARAMETERS)}")


def notebook_parameters(preset: str, extra: dict | None = None) -> dict:
    if "preset" in (extra or {}):
        raise UsageError("the preset is set by --preset, not as an extra notebook parameter")
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
        raise RunFailed(f"notebook(s) failed: {', '.join(failed)}; their outputs are {out}/<name>.failed.ipynb")
    return done
