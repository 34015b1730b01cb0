"""Batch runs: compute what each notebook needs, then execute it with papermill, locally or on Slurm.

Locally, notebooks run one after the other: first the experiments a notebook still lacks
(``runner.run_missing``), then the notebook itself, into ``_build/batch/<preset>/<name>.ipynb``.
On a cluster, ``--slurm`` writes the jobs along the experiment graph (``job_graph``): one job per run
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
import subprocess
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from cfsam.core.io import write_text_atomic
from cfsam.pipeline import cache, chapters, runner, specs
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
LIGHT = {"cpus_per_task": 4, "mem": "32G"}  # the chapters job's header defaults (no GPU), before slurm.yaml's `chapters`


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


# ------------------------------------------------------------------------------ the job graph
def _job_name(experiment: str) -> str:
    return experiment.replace("/", "--")  # sizes' experiments: tinyllama-1.1b/stage1 -> tinyllama-1.1b--stage1


def _needs(run: dict) -> list[dict]:
    """The runs a run's model is made from: a stage's parent stage, a merge's two stages; none for a base model."""
    kind = specs.run_kind(run)
    if kind == "wise_ft":
        return [run["wise_ft"]["stage1"], run["wise_ft"]["stage2"]]
    if kind == "stage" and isinstance(run["model"], dict):
        return [run["model"]]
    return []


def job_graph(preset: str, notebooks: list[str] | None = None, notebooks_dir: Path | None = None) -> list[dict]:
    """The jobs that compute what the chapters need, along the experiment graph, in topological order.

    One job per run (the experiments measuring the same model, by ``run_id``, share it), one job for every
    base-model experiment (no training), and last the ``chapters`` job that renders the notebooks. Each job is
    ``{"name", "kind": "base" | "run" | "chapters", "experiments", "pulled", "after"}``; ``after`` names the jobs
    it waits for (Slurm ``afterok``): a stage's parent stage, a merge's two stages, and for ``chapters`` every
    other job. A run that the chapters need only as a parent is trained by a job of its own too (measuring the
    preset's experiment of it, listed in ``pulled``), so that its children never wait on its lock.
    """
    nb_dir = Path(notebooks_dir or NOTEBOOKS_DIR).resolve()
    names = select_notebooks(notebooks, nb_dir)
    exps = specs.expand(preset)
    keep = set().union(*(chapters.chapter_experiments(nb, list(exps), nb_dir) for nb in names))
    by_run: dict[str, list[str]] = {}  # run id -> the preset's experiments of that run, in preset order
    for name, exp in exps.items():
        by_run.setdefault(specs.run_id(exp["run"]), []).append(name)

    jobs: dict[str, dict] = {}  # job key (run id, or "base") -> job
    job_of: dict[str, str] = {}  # run id -> job key

    def add(run: dict, pulled: bool) -> None:
        rid = specs.run_id(run)
        if rid in job_of:
            return
        key = "base" if specs.run_kind(run) == "base" else rid
        members = [n for n in by_run.get(rid, []) if n in keep]
        if not members and pulled:
            members = by_run.get(rid, [])[:1]  # a parent only: one experiment of it, so that a job trains it
        if not members:
            return  # nothing of the preset measures it: its children's jobs train it themselves
        job = jobs.setdefault(key, {"name": "base" if key == "base" else _job_name(members[0]),
                                    "kind": "base" if key == "base" else "run", "experiments": [], "pulled": [],
                                    "after": [], "run": run})
        job["experiments"] += members
        job["pulled"] += [n for n in members if n not in keep]
        job_of[rid] = key
        for parent in _needs(run):
            add(parent, pulled=True)

    for name in exps:
        if name in keep:
            add(exps[name]["run"], pulled=False)

    def upstream(run: dict) -> list[str]:
        """The jobs of the nearest ancestors of ``run`` that have a job."""
        out = []
        for parent in _needs(run):
            key = job_of.get(specs.run_id(parent))
            for k in ([key] if key else upstream(parent)):
                if k not in out:
                    out.append(k)
        return out

    for key, job in jobs.items():
        if job["kind"] == "run":
            job["after"] = upstream(job.pop("run"))
        else:
            job.pop("run")
    # topological order: a job after every job it waits for (parents first; ties in the preset's order)
    ordered, placed = [], set()
    while len(ordered) < len(jobs):
        for key, job in jobs.items():
            if key not in placed and all(a in placed for a in job["after"]):
                ordered.append(key)
                placed.add(key)
                break
    out = []
    for key in ordered:
        job = jobs[key]
        out.append({**job, "after": [jobs[a]["name"] for a in job["after"]]})
    job_names = [j["name"] for j in out]
    assert len(set(job_names)) == len(job_names) and "chapters" not in job_names, job_names
    out.append({"name": "chapters", "kind": "chapters", "experiments": [], "pulled": [], "after": job_names,
                "notebooks": names})
    return out


def show_graph(jobs: list[dict]) -> str:
    """The job graph, one line per job: name, what it computes, what it waits for."""
    lines = []
    for job in jobs:
        what = (f"notebooks {', '.join(job['notebooks'])} (papermill, no GPU)" if job["kind"] == "chapters" else
                ", ".join(n + (" (pulled in: a parent)" if n in job["pulled"] else "") for n in job["experiments"]))
        lines.append(f"{job['name']:34s} [{what}]  after: {', '.join(job['after']) or '-'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- Slurm
def slurm_config(path: Path | None = None, overrides: dict | None = None) -> dict:
    """configs/slurm.yaml (or ``path``) merged with non-None ``overrides``; unknown keys are an error.

    An optional ``chapters`` mapping overrides header settings for the light chapters job (e.g. a CPU partition).
    """
    path = Path(path or SLURM_CONFIG)
    cfg = yaml.safe_load(path.read_text()) or {}
    allowed = [*SLURM_KEYS, "extra", "setup", "accelerate", "chapters"]
    for source, keys, allowed in ((str(path), cfg, allowed), ("overrides", overrides or {}, allowed),
                                  (f"{path} (chapters)", cfg.get("chapters") or {}, [*SLURM_KEYS, "extra"])):
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


def _yaml_value(value) -> str:
    """``value`` as one line of YAML that ``-p NAME=VALUE`` reads back exactly."""
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("...\n").strip()


def sbatch_script(preset: str, job: dict, cfg: dict, *, out: Path, notebooks_dir: Path,
                  parameters: dict | None = None) -> str:
    """One job of ``job_graph``: activate the env, then train and measure its experiments across the node's GPUs
    (``accelerate launch ... run-missing --only``), or, for the chapters job, render the notebooks from the cache
    on one light node (``cfsam batch --no-compute``: it never trains)."""
    out = Path(out).resolve()
    name, light = job["name"], job["kind"] == "chapters"
    hcfg = {k: v for k, v in cfg.items() if not (light and k == "gpus_per_node")}
    if light:  # papermill only: a light default, then the config's `chapters` settings (e.g. a CPU partition)
        hcfg.update({**LIGHT, **(cfg.get("chapters") or {})})
    header = [f"#SBATCH --job-name=cfsam-{preset}-{name}", f"#SBATCH --output={out}/{name}-%j.log"]
    header += [f"#SBATCH {opt}={hcfg[key]}" for key, opt in SLURM_KEYS.items() if hcfg.get(key) is not None]
    header += [f"#SBATCH {line}" for line in hcfg.get("extra") or []]
    if light:
        cmd = ["python", "-m", "cfsam", "batch", "--preset", preset, "--no-compute",
               "--notebooks", ",".join(job["notebooks"]), "--notebooks-dir", _shown(notebooks_dir), "--out", _shown(out)]
        for pname, value in (parameters or {}).items():
            cmd += ["-p", f"{pname}={_yaml_value(value)}"]
        step = ["# 2. the notebooks, from the results cache (every experiment job has finished: nothing trains here)",
                shlex.join(cmd)]
        what = f"{len(job['notebooks'])} chapter(s)"
    else:
        config_file = accelerate_config(cfg.get("accelerate", "ddp"))
        step = ["# 2. the experiments of this job, trained and measured across the node's GPUs",
                f"accelerate launch --config_file {shlex.quote(config_file)} "
                f"--num_processes \"${{SLURM_GPUS_ON_NODE:-{cfg['gpus_per_node']}}}\" "
                f"-m cfsam run-missing --preset {shlex.quote(preset)} --only {shlex.quote(','.join(job['experiments']))}"]
        what = f"experiment(s) {', '.join(job['experiments'])}"
    after = ", ".join(job["after"]) if len(job["after"]) < 4 else f"{len(job['after'])} jobs"
    return "\n".join([
        "#!/bin/bash",
        *header,
        f"# Written by `cfsam batch --preset {preset} --slurm`: job {name}, {what}; after {after or 'nothing'} "
        "(submit_all.sh sets the dependencies).",
        "set -eo pipefail  # no -u: conda and module activation scripts read unset variables",
        f"cd {shlex.quote(str(REPO))}",
        "",
        "# 1. the project environment",
        *(cfg.get("setup") or []),
        "",
        *step,
        "",
    ])


def submit_all_script(preset: str, jobs: list[dict]) -> str:
    """sbatch every job in topological order, each with ``--dependency=afterok`` on the ids of what it waits for."""
    var = {job["name"]: f"j{i}" for i, job in enumerate(jobs, 1)}
    lines = ["#!/bin/bash", f"# The jobs of preset {preset} along the experiment graph, in topological order; "
             "a job whose dependency fails is cancelled.",
             "set -eo pipefail", 'cd "$(dirname "$0")"',
             'submit() { local id; id=$(sbatch --parsable --kill-on-invalid-dep=yes "$@"); echo "${id%%;*}"; }']
    for job in jobs:
        dep = [f"--dependency=afterok:{':'.join('$' + var[a] for a in job['after'])}"] if job["after"] else []
        lines += [f"{var[job['name']]}=$(submit {' '.join(dep + [shlex.quote(job['name'] + '.sbatch')])})",
                  f"echo \"{job['name']} ${var[job['name']]}\""]
    return "\n".join([*lines, ""])


def write_slurm(preset: str, notebooks: list[str] | None = None, *, out: Path | None = None,
                notebooks_dir: Path | None = None, config: Path | None = None, overrides: dict | None = None,
                parameters: dict | None = None, dry_run: bool = False) -> list[Path]:
    """Write ``<job>.sbatch`` per job of ``job_graph`` and ``submit_all.sh`` into ``out``; return the sbatch
    paths in submission order. With ``dry_run`` the graph and the scripts are printed instead of written."""
    load_preset(preset)
    nb_dir = Path(notebooks_dir or NOTEBOOKS_DIR).resolve()
    names = select_notebooks(notebooks, nb_dir)
    for nb in names:
        check_parameters(nb_dir / f"{nb}.ipynb")
    cfg = slurm_config(config, overrides)
    notebook_parameters(preset, parameters)  # a bad parameter fails now
    out = Path(out or default_out(preset)).resolve()
    jobs = job_graph(preset, names, nb_dir)
    scripts = {out / f"{job['name']}.sbatch": sbatch_script(preset, job, cfg, out=out, notebooks_dir=nb_dir,
                                                            parameters=parameters) for job in jobs}
    submit_text = submit_all_script(preset, jobs)
    if dry_run:
        print(f"== job graph of preset {preset}: {len(jobs)} jobs, {sum(len(j['experiments']) for j in jobs)} "
              f"experiments\n{show_graph(jobs)}")
        for path, text in scripts.items():
            print(f"== {path}\n{text}")
        print(f"== {out / 'submit_all.sh'}\n{submit_text}")
        return []
    out.mkdir(parents=True, exist_ok=True)
    for path, text in scripts.items():
        write_text_atomic(path, text, mode=0o755)
    write_text_atomic(out / "submit_all.sh", submit_text, mode=0o755)
    (out / "jobs.txt").write_text(show_graph(jobs) + "\n")
    log.info("wrote %d sbatch scripts (the job graph in jobs.txt) to %s", len(scripts), out)
    return list(scripts)


def submit(scripts: list[Path]) -> dict[str, str]:
    """Run the ``submit_all.sh`` beside ``scripts``; return {job name: Slurm job id}."""
    res = subprocess.run(["bash", str(Path(scripts[0]).parent / "submit_all.sh")], capture_output=True, text=True,
                         check=True)
    ids = dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.strip())
    for name, jid in ids.items():
        log.info("submitted %s as job %s", name, jid)
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
                  parameters=params, compute=args.compute)
        return 0
    if not args.compute:
        raise ValueError("--no-compute is for local runs; the Slurm chapters job uses it by itself")
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
        print(f"{len(scripts)} sbatch scripts in {scripts[0].parent} (the job graph: jobs.txt); submit them, with "
              f"their dependencies, with:\n  bash {scripts[0].parent / 'submit_all.sh'}")
    return 0
