"""cfsam.pipeline.batch: local papermill runs end to end on tiny notebooks of our own, and the Slurm scripts by inspection.

The real experiments are tested elsewhere: here ``runner.run_missing`` is replaced by a recorder.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from cfsam import cli
from cfsam.pipeline import batch, slurm
from cfsam.pipeline import launch as batch_command
from cfsam.pipeline import runner

PAPERMILL = str(Path(sys.executable).parent / "papermill")


def make_notebook(nb_dir: Path, name: str, body: str | None = None, parameters: str | None = None) -> Path:
    """A notebook with a `parameters` cell and a cell that writes what it received to <name>.out (in its cwd)."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters or 'preset = "default"\nresults_dir = "unset"\nseeds = [0]')
    params.metadata["tags"] = ["parameters"]
    body = body or f'from pathlib import Path\nPath("{name}.out").write_text(f"{{preset}} {{results_dir}} {{seeds}}")'
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb_dir.mkdir(parents=True, exist_ok=True)
    path = nb_dir / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def calls(monkeypatch):
    """Record run_missing calls, and which notebooks' side effects already existed at each call."""
    class Calls(list):
        pass

    seen = Calls()

    def fake(preset, notebooks=None, only=None, dry_run=False):
        seen.append({"preset": preset, "notebooks": notebooks, "dry_run": dry_run,
                     "outs_before": sorted(p.name for p in fake.nb_dir.glob("*.out")) if fake.nb_dir else []})
        return ["stage1"] if notebooks == ["fig1"] else []

    fake.nb_dir = None
    monkeypatch.setattr(runner, "run_missing", fake)
    seen.fake = fake
    return seen


def injected(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    return cells[0].source


# ------------------------------------------------------------------------------------ selection
def test_select_notebooks(tmp_path):
    for name in ("tab3", "fig1", "scratch"):  # scratch is no notebook of the book: never selected
        make_notebook(tmp_path, name)
    assert batch.select_notebooks(None, tmp_path) == ["fig1", "tab3"]
    assert batch.select_notebooks(["tab3", "fig1", "tab3"], tmp_path) == ["fig1", "tab3"]  # book order
    with pytest.raises(ValueError, match=r"unknown notebook\(s\) scratch; allowed: frontier, results, fig1"):
        batch.select_notebooks(["fig1", "scratch"], tmp_path)
    with pytest.raises(FileNotFoundError, match="tab2a.ipynb"):
        batch.select_notebooks(["tab2a"], tmp_path)
    with pytest.raises(FileNotFoundError, match="no notebooks"):
        batch.select_notebooks(None, tmp_path / "empty")


def test_bad_input_fails_before_any_work(tmp_path, calls):
    nb_dir = tmp_path / "nb"
    make_notebook(nb_dir, "fig1")
    make_notebook(nb_dir, "tab1", parameters='preset = "x"')  # lacks results_dir
    with pytest.raises(ValueError, match="unknown preset 'nope'; allowed: .*smoke"):
        batch.run_local("nope", notebooks_dir=nb_dir, out=tmp_path / "out")
    with pytest.raises(ValueError, match="unknown notebook"):
        slurm.write_slurm("smoke", ["fig9"], notebooks_dir=nb_dir, out=tmp_path / "out")
    with pytest.raises(ValueError, match="tab1.ipynb does not declare parameter.s. results_dir"):
        batch.run_local("smoke", notebooks_dir=nb_dir, out=tmp_path / "out")
    with pytest.raises(ValueError, match="unknown accelerate config 'zero9'; allowed: ddp, fsdp, deepspeed"):
        slurm.write_slurm("smoke", ["fig1"], notebooks_dir=nb_dir, out=tmp_path / "out",
                          overrides={"accelerate": "zero9"})
    with pytest.raises(ValueError, match="unknown Slurm setting.s. gpus in overrides; allowed: partition"):
        slurm.slurm_config(overrides={"gpus": 2})
    assert calls == [] and not (tmp_path / "out").exists()
    assert cli.main(["batch", "--preset", "smoke", "--notebooks", "nope", "--notebooks-dir", str(nb_dir)]) == 2


# ----------------------------------------------------------------------------------- local path
def test_local_end_to_end(tmp_path, calls):
    nb_dir, out = tmp_path / "nb", tmp_path / "out"
    make_notebook(nb_dir, "fig1")
    make_notebook(nb_dir, "tab2a")
    calls.fake.nb_dir = nb_dir
    done = batch.run_local("smoke", notebooks_dir=nb_dir, out=out, parameters={"seeds": [1, 2]})

    assert done == [out / "fig1.ipynb", out / "tab2a.ipynb"]
    # in sequence: tab2a's experiments are computed after fig1 has executed, and before tab2a has
    assert [(c["preset"], c["notebooks"], c["dry_run"], c["outs_before"]) for c in calls] == [
        ("smoke", ["fig1"], False, []), ("smoke", ["tab2a"], False, ["fig1.out"])]
    for name in ("fig1", "tab2a"):
        # the kernel ran in the notebooks directory with the injected values, and they are recorded in the output
        assert (nb_dir / f"{name}.out").read_text() == "smoke None [1, 2]"
        source = injected(out / f"{name}.ipynb")
        assert 'preset = "smoke"' in source and "results_dir = None" in source and "seeds = [1, 2]" in source
    assert sorted(p.name for p in out.iterdir()) == ["fig1.ipynb", "tab2a.ipynb"]  # no partial files left


def test_local_failure_is_kept_and_others_still_run(tmp_path, calls):
    nb_dir, out = tmp_path / "nb", tmp_path / "out"
    make_notebook(nb_dir, "tab1", body='raise ZeroDivisionError("boom")')
    make_notebook(nb_dir, "tab2a")
    with pytest.raises(RuntimeError, match=r"notebook\(s\) failed: tab1"):
        batch.run_local("smoke", notebooks_dir=nb_dir, out=out)
    assert [c["notebooks"] for c in calls] == [["tab1"], ["tab2a"]]
    assert sorted(p.name for p in out.iterdir()) == ["tab1.failed.ipynb", "tab2a.ipynb"]
    assert "ZeroDivisionError" in str(nbformat.read(out / "tab1.failed.ipynb", as_version=4).cells)
    assert (nb_dir / "tab2a.out").read_text() == "smoke None [0]"


def test_local_dry_run(tmp_path, calls, capsys):
    nb_dir, out = tmp_path / "nb", tmp_path / "out"
    make_notebook(nb_dir, "fig1")
    assert batch.run_local("smoke", notebooks_dir=nb_dir, out=out, dry_run=True) == []
    assert [(c["notebooks"], c["dry_run"]) for c in calls] == [(["fig1"], True)]
    cmd = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("papermill ")]
    assert cmd == [["papermill", str(nb_dir / "fig1.ipynb"), str(out / "fig1.ipynb"), "--cwd", str(nb_dir),
                    "-k", "python3", "-p", "preset", "smoke", "-p", "results_dir", "None"]]
    assert not out.exists() and not (nb_dir / "fig1.out").exists()


# ----------------------------------------------------------------------------------- Slurm path
def _lines(script: str, start: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(start)]


def test_slurm_scripts(tmp_path, calls):
    nb_dir, out = tmp_path / "nb", tmp_path / "out"
    make_notebook(nb_dir, "fig1")
    make_notebook(nb_dir, "tab4")
    defaults = yaml.safe_load(slurm.SLURM_CONFIG.read_text())
    scripts = slurm.write_slurm("smoke", notebooks_dir=nb_dir, out=out, parameters={"seeds": [3]},
                                overrides={"partition": "debug", "time": "01:30:00", "gpus_per_node": 4,
                                           "accelerate": "fsdp"})
    jobs = slurm.job_graph("smoke", None, nb_dir)
    assert scripts == [out / f"{j['name']}.sbatch" for j in jobs] and calls == []  # nothing trained here
    assert scripts[0].name == "base.sbatch" and scripts[-1].name == "chapters.sbatch"
    assert (out / "jobs.txt").read_text().startswith("base ")

    for job, path in zip(jobs, scripts):
        name, text = job["name"], path.read_text()
        assert os.access(path, os.X_OK) and text.startswith("#!/bin/bash\n")
        header = _lines(text, "#SBATCH ")
        # sbatch reads #SBATCH lines only before the first command
        first_command = next(i for i, l in enumerate(text.splitlines()) if l.strip() and not l.startswith("#"))
        assert all(text.splitlines().index(h) < first_command for h in header)
        assert {"#SBATCH --partition=debug", "#SBATCH --time=01:30:00",
                f"#SBATCH --job-name=cfsam-smoke-{name}", f"#SBATCH --output={out}/{name}-%j.log"} <= set(header)
        assert not any(h.startswith("#SBATCH --account") for h in header)  # null in slurm.yaml: left out
        body = text.splitlines()
        setup = [body.index(line) for line in defaults["setup"]]
        if name == "chapters":  # one light node: no GPU, papermill only, never trains
            assert not any(h.startswith("#SBATCH --gpus") for h in header)
            assert {"#SBATCH --cpus-per-task=4", "#SBATCH --mem=32G"} <= set(header)
            assert not _lines(text, "accelerate")
            (render,) = _lines(text, "python -m cfsam batch")
            assert max(setup) < body.index(render)
            args = cli.build_parser().parse_args(shlex.split(render)[3:])
            assert (args.preset, args.compute, args.slurm, args.notebooks) == ("smoke", False, False, "fig1,tab4")
            assert (args.notebooks_dir, args.out) == (nb_dir, out)
            assert batch_command._parse_params(args.param) == {"seeds": [3]}
            continue
        assert {"#SBATCH --gpus-per-node=4", f"#SBATCH --mem={defaults['mem']}",
                f"#SBATCH --cpus-per-task={defaults['cpus_per_task']}"} <= set(header)
        (launch,) = _lines(text, "accelerate launch")
        assert max(setup) < body.index(launch) and not _lines(text, "papermill")
        argv = shlex.split(launch)
        assert argv[argv.index("--config_file") + 1] == "configs/accelerate_fsdp.yaml"
        assert argv[argv.index("-m") + 1:] == ["cfsam", "run-missing", "--preset", "smoke", "--only",
                                               ",".join(job["experiments"])]
        assert argv[argv.index("--num_processes") + 1] == "${SLURM_GPUS_ON_NODE:-4}"

    for script in [*scripts, out / "submit_all.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_local_no_compute(tmp_path, calls):
    """The chapters job's command: papermill only, never run_missing."""
    nb_dir, out = tmp_path / "nb", tmp_path / "out"
    make_notebook(nb_dir, "fig1")
    assert cli.main(["batch", "--preset", "smoke", "--no-compute", "--notebooks-dir", str(nb_dir), "--out", str(out),
                     "-p", "seeds=[3]"]) == 0
    assert calls == [] and (nb_dir / "fig1.out").read_text() == "smoke None [3]"
    assert sorted(p.name for p in out.iterdir()) == ["fig1.ipynb"]
    assert cli.main(["batch", "--preset", "smoke", "--no-compute", "--slurm", "--notebooks-dir", str(nb_dir)]) == 2


def test_paper_job_graph(tmp_path, capsys):
    """paper: one job per run along the experiment graph, not one 8-GPU job per chapter."""
    from cfsam.pipeline import chapters, specs

    exps = specs.expand("paper")
    jobs = slurm.job_graph("paper")
    by_name = {j["name"]: j for j in jobs}
    job_of = {e: j["name"] for j in jobs for e in j["experiments"]}
    listed = [e for j in jobs for e in j["experiments"]]
    assert len(listed) == len(set(listed)) and set(listed) == set(exps)  # each experiment in exactly one job
    for j in jobs:  # a run job measures one model
        if j["kind"] == "run":
            assert len({specs.run_id(exps[e]["run"]) for e in j["experiments"]}) == 1
    order = [j["name"] for j in jobs]
    assert all(order.index(a) < order.index(j["name"]) for j in jobs for a in j["after"])  # topological

    assert by_name["base"]["after"] == [] and set(by_name["base"]["experiments"]) == {
        e for e in exps if specs.run_kind(exps[e]["run"]) == "base"}
    for size in ("", "tinyllama-1.1b/", "llama2-13b/"):
        assert by_name[job_of[size + "stage1"]]["after"] == []
    for e, exp in exps.items():
        run, j = exp["run"], by_name[job_of[e]]
        if specs.run_kind(run) == "stage" and isinstance(run["model"], dict):  # stage 2: after its stage 1
            parent = next(n for n in exps if specs.run_id(exps[n]["run"]) == specs.run_id(run["model"]))
            assert j["after"] == [job_of[parent]], e
    for e in ("wiseft-open-platypus-adamw", "wiseft-open-platypus-sam"):
        assert by_name[job_of[e]]["after"] == ["stage1", job_of[e.replace("wiseft", "s2")]]
    assert jobs[-1]["name"] == "chapters" and jobs[-1]["after"] == order[:-1]
    assert jobs[-1]["notebooks"] == chapters.chapters()
    n_chapters = len(chapters.chapters())
    assert len(jobs) == len({specs.run_id(x["run"]) for x in exps.values()}) - 2 + 1  # 3 base models in 1 job
    assert len(jobs) < 16 * n_chapters
    # the old layout measured each chapter's experiments in the chapter's job: far more launches than runs
    assert sum(len(specs.needed("paper", [nb])) for nb in chapters.chapters()) > 4 * len(listed)

    out = tmp_path / "out"
    assert cli.main(["batch", "--preset", "paper", "--slurm", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert f"== job graph of preset paper: {len(jobs)} jobs, {len(exps)} experiments" in printed
    assert "wiseft-open-platypus-sam" in printed and "after: stage1, s2-open-platypus-sam" in printed
    assert printed.count("#!/bin/bash") == len(jobs) + 1
    assert "j3=$(submit --dependency=afterok:$j2 " in printed


def test_submit_all_and_cli(tmp_path, monkeypatch, capsys):
    nb_dir, out, bin_dir = tmp_path / "nb", tmp_path / "out", tmp_path / "bin"
    make_notebook(nb_dir, "fig1")
    make_notebook(nb_dir, "tab2b")
    common = ["batch", "--preset", "smoke", "--slurm", "--notebooks-dir", str(nb_dir), "--out", str(out)]

    assert cli.main([*common, "--dry-run", "--gpus", "2"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists() and "#SBATCH --gpus-per-node=2" in printed and "--only s2-open-platypus-sam" in printed

    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no sbatch: --submit is refused before writing
    assert cli.main([*common, "--submit"]) == 2 and not out.exists()
    monkeypatch.undo()

    assert cli.main([*common, "--partition", "a100", "--accelerate", "deepspeed"]) == 0
    assert "submit_all.sh" in capsys.readouterr().out
    assert "#SBATCH --partition=a100" in (out / "stage1.sbatch").read_text()
    assert "configs/accelerate_deepspeed_zero3.yaml" in (out / "s2-auto-wiki-sam.sbatch").read_text()

    # submit_all.sh submits every script once, after what it depends on, with afterok on their job ids
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/bash\nn=$(( $(cat {tmp_path}/n 2>/dev/null || echo 100) + 1 )); echo $n > {tmp_path}/n\n'
                    f'echo "$n $PWD $*" >> {tmp_path}/submitted\necho "$n;cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    ids = slurm.submit(sorted(out.glob("*.sbatch")))
    jobs = slurm.job_graph("smoke", None, nb_dir)
    assert list(ids) == [j["name"] for j in jobs] and ids["base"] == "101"
    rows = [line.split() for line in (tmp_path / "submitted").read_text().splitlines()]
    assert all(r[1] == str(out) and "--parsable" in r and "--kill-on-invalid-dep=yes" in r for r in rows)
    for job, row in zip(jobs, rows):
        assert row[0] == ids[job["name"]] and row[-1] == f"{job['name']}.sbatch"
        dep = [a for a in row if a.startswith("--dependency=")]
        assert dep == ([f"--dependency=afterok:{':'.join(ids[a] for a in job['after'])}"] if job["after"] else [])
    assert ids["s2-open-platypus-sam"] in rows[-1][-2]  # the chapters job waits on every experiment job
