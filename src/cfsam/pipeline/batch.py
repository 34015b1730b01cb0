"""Batch runs: compute what each notebook needs, then execute it with papermill, locally or on Slurm.

Locally, notebooks run one after the other: first the experiments a notebook still lacks
(``runner.run_missing``), then the notebook itself, into ``_build/batch/<preset>/<name>.ipynb``.
On a cluster, ``--slurm`` writes one sbatch script per notebook (and ``submit_all.sh``): each job
trains the notebook's missing experiments across its node's GPUs with ``accelerate launch`` and then
renders the notebook with the ``papermill`` command. Jobs are independent of each other, so they can run
side by side; the ``#SBATCH`` header comes from ``configs/slurm.yaml`` with command-line overrides.

Notebooks are parameterised by papermill through a cell tagged ``parameters`` that declares at least
``preset`` and ``results_dir`` (None = the cache's default, ``cache.results_dir(preset)``).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from cfsam.core.io import write_text_atomic
from cfsam.pipeline import cache, chapters, runner
from cfsam.pipeline.presets import load_preset

log = logging.getLogger(__name__)

REPO = cache.REPO
NOTEBOOKS_DIR = REPO / "notebooks"
SLURM_CONFIG = REPO / "configs" / "slurm.yaml"
KERNEL = "python3"
# Parameters every notebook's `parameters` cell must declare; checked before anything runs.
REQUIRED_PARAMETERS = ("preset", "results_dir")
ACCELERATE_CONFIGS = {"ddp": "configs/accelerate_ddp.yaml", "fsdp": "configs/accelerate_fsdp.yaml",
                      "deepspeed": "configs/accelerate_deepspeed_zero3.yaml"}
SLURM_KEYS = {"partition": "--partition", "account": "--account", "nodes": "--nodes",
              "gpus_per_node": "--gpus-per-node", "cpus_per_task": "--cpus-per-task", "mem": "--mem",
              "time": "--time"}  # configs/slurm.yaml key -> sbatch option; it also holds extra, setup, accelerate


def default_out(preset: str) -> Path:
    return REPO / "_build" / "batch" / preset


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


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it (scripts `cd` there), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def papermill_command(notebook: Path, output: Path, parameters: dict) -> list[str]:
    """The `papermill` command line equivalent to the local run (None is passed as papermill's "None")."""
    cmd = ["papermill", _shown(notebook), _shown(output), "--cwd", _shown(Path(notebook).parent), "-k", KERNEL]
    for name, value in parameters.items():
        # -p guesses types (None, True, ints, floats, else str); -y keeps anything else exact as YAML
        if value is None or isinstance(value, (bool, int, float, str)):
            cmd += ["-p", name, "None" if value is None else str(value)]
        else:
            cmd += ["-y", yaml.safe_dump({name: value}, default_flow_style=True).strip()]
    return cmd


# ------------------------------------------------------------------------------------- local
def run_local(preset: str, notebooks: list[str] | None = None, *, out: Path | None = None,
              notebooks_dir: Path | None = None, dry_run: bool = False, parameters: dict | None = None) -> list[Path]:
    """Per notebook, in sequence: run its missing experiments, then execute it into ``out``.

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
            print(f"== {nb}: experiments still needed")
            runner.run_missing(preset, notebooks=[nb], dry_run=True)
            print(shlex.join(papermill_command(nb_dir / f"{nb}.ipynb", out / f"{nb}.ipynb", params)))
        return []

    import papermill

    out.mkdir(parents=True, exist_ok=True)
    done, failed = [], []
    for nb in tqdm(names, desc=f"notebooks ({preset})"):
        started = time.time()
        ran = runner.run_missing(preset, notebooks=[nb])
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


# ------------------------------------------------------------------------------------- Slurm
def slurm_config(path: Path | None = None, overrides: dict | None = None) -> dict:
    """configs/slurm.yaml (or ``path``) merged with non-None ``overrides``; unknown keys are an error."""
    path = Path(path or SLURM_CONFIG)
    cfg = yaml.safe_load(path.read_text()) or {}
    allowed = [*SLURM_KEYS, "extra", "setup", "accelerate"]
    for source, keys in ((str(path), cfg), ("overrides", overrides or {})):
        bad = [k for k in keys if k not in allowed]
        if bad:
            raise ValueError(f"unknown Slurm setting(s) {', '.join(bad)} in {source}; allowed: {', '.join(allowed)}")
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    gpus = cfg.get("gpus_per_node")
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"Slurm setting gpus_per_node={gpus!r} must be an integer >= 1")
    config_file = accelerate_config(cfg.get("accelerate", "ddp"))  # an unknown name fails now
    if not (REPO / config_file).exists():
        log.warning("accelerate config %s does not exist (yet); the jobs will fail without it", config_file)
    return cfg


def accelerate_config(name: str) -> str:
    """The accelerate config file of a strategy name (ddp | fsdp | deepspeed), or a YAML path as given."""
    if name in ACCELERATE_CONFIGS:
        return ACCELERATE_CONFIGS[name]
    if str(name).endswith((".yaml", ".yml")):
        return str(name)
    raise ValueError(f"unknown accelerate config {name!r}; allowed: {', '.join(ACCELERATE_CONFIGS)} or a .yaml path")


def sbatch_script(preset: str, notebook: str, cfg: dict, *, out: Path, notebooks_dir: Path,
                  parameters: dict | None = None) -> str:
    """One job: (1) activate the env, (2) train the notebook's missing experiments, (3) render the notebook."""
    out = Path(out).resolve()
    header = [f"#SBATCH --job-name=cfsam-{preset}-{notebook}", f"#SBATCH --output={out}/{notebook}-%j.log"]
    header += [f"#SBATCH {opt}={cfg[key]}" for key, opt in SLURM_KEYS.items() if cfg.get(key) is not None]
    header += [f"#SBATCH {line}" for line in cfg.get("extra") or []]
    config_file = accelerate_config(cfg.get("accelerate", "ddp"))
    launch = (f"accelerate launch --config_file {shlex.quote(config_file)} "
              f"--num_processes \"${{SLURM_GPUS_ON_NODE:-{cfg['gpus_per_node']}}}\" "
              f"-m cfsam run-missing --preset {shlex.quote(preset)} --notebooks {shlex.quote(notebook)}")
    render = shlex.join(papermill_command(Path(notebooks_dir) / f"{notebook}.ipynb", out / f"{notebook}.ipynb",
                                          notebook_parameters(preset, parameters)))
    return "\n".join([
        "#!/bin/bash",
        *header,
        f"# Written by `cfsam batch --preset {preset} --slurm`: notebook {notebook}.",
        "set -eo pipefail  # no -u: conda and module activation scripts read unset variables",
        f"cd {shlex.quote(str(REPO))}",
        "",
        "# 1. the project environment",
        *(cfg.get("setup") or []),
        "",
        "# 2. the experiments this notebook still needs, trained across the node's GPUs",
        launch,
        "",
        "# 3. the notebook, from the results cache",
        render,
        "",
    ])


def write_slurm(preset: str, notebooks: list[str] | None = None, *, out: Path | None = None,
                notebooks_dir: Path | None = None, config: Path | None = None, overrides: dict | None = None,
                parameters: dict | None = None, dry_run: bool = False) -> list[Path]:
    """Write ``<notebook>.sbatch`` per notebook and ``submit_all.sh`` into ``out``; return the sbatch paths.

    With ``dry_run`` the scripts are printed instead of written.
    """
    load_preset(preset)
    nb_dir = Path(notebooks_dir or NOTEBOOKS_DIR).resolve()
    names = select_notebooks(notebooks, nb_dir)
    for nb in names:
        check_parameters(nb_dir / f"{nb}.ipynb")
    cfg = slurm_config(config, overrides)
    out = Path(out or default_out(preset)).resolve()
    scripts = {out / f"{nb}.sbatch": sbatch_script(preset, nb, cfg, out=out, notebooks_dir=nb_dir,
                                                   parameters=parameters) for nb in names}
    submit = "\n".join(["#!/bin/bash", f"# One independent job per notebook of preset {preset}.",
                        "set -eo pipefail", 'cd "$(dirname "$0")"',
                        *(f"sbatch {shlex.quote(p.name)}" for p in scripts), ""])
    if dry_run:
        for path, text in scripts.items():
            print(f"== {path}\n{text}")
        print(f"== {out / 'submit_all.sh'}\n{submit}")
        return []
    out.mkdir(parents=True, exist_ok=True)
    for path, text in scripts.items():
        write_text_atomic(path, text, mode=0o755)
    write_text_atomic(out / "submit_all.sh", submit, mode=0o755)
    log.info("wrote %d sbatch scripts to %s", len(scripts), out)
    return list(scripts)


def submit(scripts: list[Path]) -> list[str]:
    """sbatch each script; return the job ids."""
    ids = []
    for script in scripts:
        res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True)
        ids.append(res.stdout.strip().split(";")[0])
        log.info("submitted %s as job %s", script.name, ids[-1])
    return ids


# --------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    """The options of ``cfsam batch`` (registered by ``cfsam.cli``)."""
    p.add_argument("--preset", default="cpu")
    p.add_argument("--notebooks", help="comma-separated chapter names (default: every chapter of _toc.yml)")
    p.add_argument("--out", type=Path, help="output directory (default: _build/batch/<preset>/)")
    p.add_argument("--notebooks-dir", type=Path, help="where the notebooks are (default: notebooks/)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="extra notebook parameter, VALUE read as YAML (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print what would run (or the scripts) and stop")
    s = p.add_argument_group("Slurm")
    s.add_argument("--slurm", action="store_true", help="write one sbatch script per notebook instead of running")
    s.add_argument("--slurm-config", type=Path, help="header defaults and env setup (default: configs/slurm.yaml)")
    s.add_argument("--partition")
    s.add_argument("--gpus", type=int, help="GPUs per node (= training processes)")
    s.add_argument("--time", help="wall-time limit, e.g. 12:00:00")
    s.add_argument("--accelerate", help=f"{' | '.join(ACCELERATE_CONFIGS)} or a config path (default from the "
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
    notebooks = args.notebooks.split(",") if args.notebooks else None
    params = _parse_params(args.param)
    if not args.slurm:
        run_local(args.preset, notebooks, out=args.out, notebooks_dir=args.notebooks_dir, dry_run=args.dry_run,
                  parameters=params)
        return 0
    if args.submit and not args.dry_run and shutil.which("sbatch") is None:
        raise RuntimeError("--submit: sbatch is not on PATH; write the scripts without --submit and run "
                           "submit_all.sh on the cluster")
    overrides = {"partition": args.partition, "gpus_per_node": args.gpus, "time": args.time,
                 "accelerate": args.accelerate}
    scripts = write_slurm(args.preset, notebooks, out=args.out, notebooks_dir=args.notebooks_dir,
                          config=args.slurm_config, overrides=overrides, parameters=params, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    if args.submit:
        submit(scripts)
    else:
        print(f"sbatch scripts in {scripts[0].parent}; submit them with:\n  bash {scripts[0].parent / 'submit_all.sh'}"
              f"\nor one at a time, e.g.:\n  sbatch {scripts[0]}")
    return 0
