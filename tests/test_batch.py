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
from cfsam.pipeline import batch
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
    with pytest.raises(ValueError, match=r"unknown notebook\(s\) scratch; allowed: results, fig1, tab1"):
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
        batch.write_slurm("smoke", ["fig9"], notebooks_dir=nb_dir, out=tmp_path / "out")
    with pytest.raises(ValueError, match="tab1.ipynb does not declare parameter.s. results_dir"):
        batch.run_local("smoke", notebooks_dir=nb_dir, out=tmp_path / "out")
    with pytest.raises(ValueError, match="unknown accelerate config 'zero9'; allowed: ddp, fsdp, deepspeed"):
        batch.write_slurm("smoke", ["fig1"], notebooks_dir=nb_dir, out=tmp_path / "out",
                          overrides={"accelerate": "zero9"})
    with pytest.raises(ValueError, match="unknown Slurm setting.s. gpus in overrides; allowed: partition"):
        batch.slurm_config(overrides={"gpus": 2})
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
    defaults = yaml.safe_load(batch.SLURM_CONFIG.read_text())
    scripts = batch.write_slurm("smoke", notebooks_dir=nb_dir, out=out, parameters={"seeds": [3]},
                                overrides={"partition": "debug", "time": "01:30:00", "gpus_per_node": 4,
                                           "accelerate": "fsdp"})
    assert scripts == [out / "fig1.sbatch", out / "tab4.sbatch"] and calls == []  # nothing trained here

    for name, path in zip(["fig1", "tab4"], scripts):
        text = path.read_text()
        assert os.access(path, os.X_OK) and text.startswith("#!/bin/bash\n")
        header = _lines(text, "#SBATCH ")
        # sbatch reads #SBATCH lines only before the first command
        first_command = next(i for i, l in enumerate(text.splitlines()) if l.strip() and not l.startswith("#"))
        assert all(text.splitlines().index(h) < first_command for h in header)
        assert {"#SBATCH --partition=debug", "#SBATCH --time=01:30:00", "#SBATCH --gpus-per-node=4",
                f"#SBATCH --mem={defaults['mem']}", f"#SBATCH --cpus-per-task={defaults['cpus_per_task']}",
                f"#SBATCH --job-name=cfsam-smoke-{name}", f"#SBATCH --output={out}/{name}-%j.log"} <= set(header)
        assert not any(h.startswith("#SBATCH --account") for h in header)  # null in slurm.yaml: left out

        body = text.splitlines()
        setup = [body.index(line) for line in defaults["setup"]]
        (launch,) = _lines(text, "accelerate launch")
        (render,) = _lines(text, "papermill ")
        assert max(setup) < body.index(launch) < body.index(render)  # env, then training, then the notebook
        argv = shlex.split(launch)
        assert argv[argv.index("--config_file") + 1] == "configs/accelerate_fsdp.yaml"
        assert argv[argv.index("-m") + 1:] == ["cfsam", "run-missing", "--preset", "smoke", "--notebooks", name]
        assert argv[argv.index("--num_processes") + 1] == "${SLURM_GPUS_ON_NODE:-4}"

        # the papermill line is one the real papermill accepts: prepare (inject, no kernel) from it
        pm = shlex.split(render)
        assert pm[1:3] == [str(nb_dir / f"{name}.ipynb"), str(out / f"{name}.ipynb")]
        prepared = tmp_path / f"{name}-prepared.ipynb"
        subprocess.run([PAPERMILL, pm[1], str(prepared), *pm[3:], "--prepare-only"], check=True, cwd=batch.REPO,
                       capture_output=True)
        source = injected(prepared)
        assert 'preset = "smoke"' in source and "results_dir = None" in source and "seeds = [3]" in source

    for script in [*scripts, out / "submit_all.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_submit_all_and_cli(tmp_path, monkeypatch, capsys):
    nb_dir, out, bin_dir = tmp_path / "nb", tmp_path / "out", tmp_path / "bin"
    make_notebook(nb_dir, "fig1")
    make_notebook(nb_dir, "tab2b")
    common = ["batch", "--preset", "smoke", "--slurm", "--notebooks-dir", str(nb_dir), "--out", str(out)]

    assert cli.main([*common, "--dry-run", "--gpus", "2"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists() and "#SBATCH --gpus-per-node=2" in printed and "--notebooks tab2b" in printed

    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no sbatch: --submit is refused before writing
    assert cli.main([*common, "--submit"]) == 2 and not out.exists()
    monkeypatch.undo()

    assert cli.main([*common, "--partition", "a100", "--accelerate", "deepspeed"]) == 0
    assert "submit_all.sh" in capsys.readouterr().out
    assert "#SBATCH --partition=a100" in (out / "tab2b.sbatch").read_text()
    assert "configs/accelerate_deepspeed_zero3.yaml" in (out / "fig1.sbatch").read_text()

    # submit_all.sh submits every script once, from wherever it is called
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/bash\necho "$PWD/$1" >> {tmp_path}/submitted\necho 42\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(out / "submit_all.sh")], check=True, cwd=tmp_path, env=env, capture_output=True)
    assert (tmp_path / "submitted").read_text().split() == [str(out / "fig1.sbatch"), str(out / "tab2b.sbatch")]
