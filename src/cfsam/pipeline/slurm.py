"""Slurm jobs along the experiment graph: one job per model a preset trains or merges (its experiments
measured in it), chained with ``--dependency=afterok``, and one light job that renders the chapters.
``cfsam batch --slurm`` writes them (``--dry-run`` shows the graph); ``submit_all.sh`` submits them in order.
"""
from __future__ import annotations

import logging
import shlex
import subprocess
from pathlib import Path

import yaml

from cfsam.core.errors import UsageError
from cfsam.core.io import write_text_atomic
from cfsam.pipeline import chapters, runs, specs
from cfsam.pipeline.presets import load_preset, preset_name

log = logging.getLogger(__name__)

from cfsam.pipeline.batch import (NOTEBOOKS_DIR, REPO, check_parameters, default_out, notebook_parameters,
                                  select_notebooks, shown)

SLURM_CONFIG = REPO / "configs" / "slurm.yaml"


ACCELERATE_CONFIGS = {"ddp": "configs/accelerate_ddp.yaml", "fsdp": "configs/accelerate_fsdp.yaml",
                      "deepspeed": "configs/accelerate_deepspeed_zero3.yaml"}
# `accelerate: auto` (configs/slurm.yaml's default): DDP, unless a job's model does not fit one GPU under DDP.
# DDP keeps on every GPU the fp32 weights, their gradients and AdamW's two moments: 16 bytes a parameter
# (7B: ~108 GB, 13B: ~208 GB), before any activation; FSDP shards all four over the node's GPUs.
BYTES_PER_PARAM_DDP = 16
GPU_MEMORY_GB = 80  # one A100/H100 80GB: the largest GPU a cluster is assumed to have


SLURM_KEYS = {"partition": "--partition", "account": "--account", "nodes": "--nodes",
              "gpus_per_node": "--gpus-per-node", "cpus_per_task": "--cpus-per-task", "mem": "--mem",
              "time": "--time"}  # configs/slurm.yaml key -> sbatch option; it also holds extra, setup, accelerate


LIGHT = {"cpus_per_task": 4, "mem": "32G"}  # the chapters job's header defaults (no GPU), before slurm.yaml's `chapters`


def _job_name(experiment: str) -> str:
    return experiment.replace("/", "--")  # sizes' experiments: tinyllama-1.1b/stage1 -> tinyllama-1.1b--stage1


def _trained(run: dict) -> dict:
    """The run a job trains for ``run``: a snapshot's stage (its snapshots are saved while it trains), else itself."""
    r = runs.parse(run)
    return r.run if isinstance(r, runs.Snapshot) else run


def _needs(run: dict) -> list[dict]:
    """The runs a run's model is made from: a stage's parent stage, a merge's two stages; none for a base model."""
    return runs.parse(_trained(run)).parents()


def job_graph(preset: str, notebooks: list[str] | None = None, notebooks_dir: Path | None = None) -> list[dict]:
    """The jobs that compute what the chapters need, along the experiment graph, in topological order.

    One job per run (the experiments measuring the same model, by ``run_id``, share it; so do the snapshots
    saved along one stage, ``*-1of4`` ... ``*-4of4``: the job that trains the stage measures every one of
    them, and no other job trains it), one job for every base-model experiment (no training), and last the
    ``chapters`` job that renders the notebooks. Each job is
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
        by_run.setdefault(specs.run_id(_trained(exp["run"])), []).append(name)

    jobs: dict[str, dict] = {}  # job key (run id, or "base") -> job
    job_of: dict[str, str] = {}  # run id -> job key

    def add(run: dict, pulled: bool) -> None:
        run = _trained(run)
        rid = specs.run_id(run)
        if rid in job_of:
            return
        key = "base" if runs.parse(run).kind == "base" else rid
        members = [n for n in by_run.get(rid, []) if n in keep]
        if not members and pulled:
            members = by_run.get(rid, [])[:1]  # a parent only: one experiment of it, so that a job trains it
        if not members:
            return  # nothing of the preset measures it: its children's jobs train it themselves
        job = jobs.setdefault(key, {"name": "base" if key == "base" else _job_name(members[0]),
                                    "kind": "base" if key == "base" else "run", "experiments": [], "pulled": [],
                                    "after": [], "run": run, "model": runs.parse(run).base_model()})
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
            key = job_of.get(specs.run_id(_trained(parent)))
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
            raise UsageError(f"unknown Slurm setting(s) {', '.join(bad)} in {source}; allowed: {', '.join(allowed)}")
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    gpus = cfg.get("gpus_per_node")
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise UsageError(f"Slurm setting gpus_per_node={gpus!r} must be an integer >= 1")
    config_file = accelerate_config(cfg.get("accelerate", "auto"))  # an unknown name fails now
    if not (REPO / config_file).exists():
        log.warning("accelerate config %s does not exist (yet); the jobs will fail without it", config_file)
    return cfg


def accelerate_config(name: str) -> str:
    """The accelerate config file of a strategy name (ddp | fsdp | deepspeed), or a YAML path as given; auto: DDP's
    (a job whose model does not fit one GPU under DDP gets FSDP's instead: ``job_accelerate``)."""
    if name == "auto":
        return ACCELERATE_CONFIGS["ddp"]
    if name in ACCELERATE_CONFIGS:
        return ACCELERATE_CONFIGS[name]
    if str(name).endswith((".yaml", ".yml")):
        return str(name)
    raise UsageError(f"unknown accelerate config {name!r}; allowed: {', '.join(ACCELERATE_CONFIGS)}, auto or a .yaml "
                     "path")


def job_accelerate(job: dict, name: str) -> tuple[str, str | None]:
    """The accelerate config of a job and, where the model decides it, the comment that says why."""
    from cfsam.core import registry

    params = registry.entries("models").get(job.get("model") or "", {}).get("params")
    need = params * BYTES_PER_PARAM_DDP / 1e9 if params else 0.0
    if need <= GPU_MEMORY_GB or name not in ("auto", "ddp"):
        return accelerate_config(name), None
    why = (f"{job['model']}'s fp32 weights, gradients and AdamW state need about {need:.0f} GB per GPU under DDP, "
           f"more than a {GPU_MEMORY_GB} GB GPU holds")
    if name == "ddp":  # asked for by name: kept, with the warning
        log.warning("job %s runs DDP as asked, but %s: use --accelerate fsdp", job["name"], why)
        return accelerate_config(name), f"# WARNING: {why}; DDP as asked (--accelerate fsdp shards them)"
    return ACCELERATE_CONFIGS["fsdp"], f"# FSDP: {why}; FSDP shards them over the node's GPUs"


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
    header = [f"#SBATCH --job-name=cfsam-{preset_name(preset)}-{name}", f"#SBATCH --output={out}/{name}-%j.log"]
    header += [f"#SBATCH {opt}={hcfg[key]}" for key, opt in SLURM_KEYS.items() if hcfg.get(key) is not None]
    header += [f"#SBATCH {line}" for line in hcfg.get("extra") or []]
    if light:
        cmd = ["python", "-m", "cfsam", "batch", "--preset", preset, "--no-compute",
               "--notebooks", ",".join(job["notebooks"]), "--notebooks-dir", shown(notebooks_dir), "--out", shown(out)]
        for pname, value in (parameters or {}).items():
            cmd += ["-p", f"{pname}={_yaml_value(value)}"]
        step = ["# 2. the notebooks, from the results cache (every experiment job has finished: nothing trains here)",
                shlex.join(cmd)]
        what = f"{len(job['notebooks'])} chapter(s)"
    else:
        config_file, why = job_accelerate(job, cfg.get("accelerate", "auto"))
        step = ["# 2. the experiments of this job, trained and measured across the node's GPUs", *([why] if why else []),
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
