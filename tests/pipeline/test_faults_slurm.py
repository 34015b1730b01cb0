"""Issue 27 #2 and #14: Slurm jobs along the experiment graph train every stage once, and the large models'
jobs shard their weights."""
import pytest

from cfsam import cli
from cfsam.pipeline import slurm, specs


def _ancestors(jobs: list[dict]) -> dict[str, set[str]]:
    after = {j["name"]: set(j["after"]) for j in jobs}
    out: dict[str, set[str]] = {}
    for j in jobs:  # topological order: every job's ancestors are known before it
        out[j["name"]] = set().union(*([after[j["name"]]] + [out[a] for a in after[j["name"]]]))
    return out


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_every_stage_is_trained_by_one_job_that_the_others_wait_for(preset):
    """For every stage some job needs, one job needs it first and every other job that needs it runs after
    that one (afterok): no two jobs train one stage, and none holds a node waiting on another's lock."""
    exps = specs.expand(preset)
    jobs = [j for j in slurm.job_graph(preset) if j["kind"] != "chapters"]
    ancestors = _ancestors(jobs)
    needs: dict[str, list[str]] = {}  # stage id -> jobs whose experiments need it trained, in job order
    for j in jobs:
        for stage in {specs.run_id(s): s for e in j["experiments"] for s in specs._stage_runs(exps[e]["run"])}:
            needs.setdefault(stage, []).append(j["name"])
    for stage, names in needs.items():
        owner = names[0]
        assert all(owner in ancestors[n] for n in names[1:]), (stage, names)
    # a stage's snapshots are measured in the job that trains it
    snaps = [e for e in exps if specs.run_kind(exps[e]["run"]) == "snapshot"]
    assert snaps
    job_of = {e: j["name"] for j in jobs for e in j["experiments"]}
    for e in snaps:
        first = e.rsplit("-", 1)[0] + "-1of" + e.rsplit("of", 1)[1]
        assert job_of[e] == job_of[first], e


def test_dry_run_shows_snapshots_after_their_parent(capsys):
    assert cli.main(["batch", "--preset", "smoke", "--slurm", "--dry-run"]) == 0
    graph = [line for line in capsys.readouterr().out.splitlines() if "1of4" in line and "after:" in line]
    assert graph and all("after: -" not in line for line in graph)


def test_the_paper_presets_large_models_are_sharded_by_default(tmp_path, caplog):
    """#14: DDP keeps fp32 weights, gradients and AdamW's moments whole on every GPU: 16 bytes a parameter,
    ~108 GB at 7B and ~208 GB at 13B, more than an 80 GB GPU."""
    from cfsam.core import registry

    jobs = {j["name"]: j for j in slurm.job_graph("paper")}
    cfg = slurm.slurm_config()
    assert cfg["accelerate"] == "auto"
    for name, model in (("stage1", "llama2-7b"), ("llama2-13b--stage1", "llama2-13b"),
                        ("tinyllama-1.1b--stage1", "tinyllama-1.1b")):
        text = slurm.sbatch_script("paper", jobs[name], cfg, out=tmp_path, notebooks_dir=tmp_path)
        need = registry.entries("models")[model]["params"] * 16 / 1e9
        big = need > 80
        assert ("configs/accelerate_fsdp.yaml" in text) == big and ("configs/accelerate_ddp.yaml" in text) != big
        if big:
            assert f"need about {need:.0f} GB per GPU under DDP" in text
    # DDP asked for by name is kept, with a warning in the script and the log
    text = slurm.sbatch_script("paper", jobs["stage1"], {**cfg, "accelerate": "ddp"}, out=tmp_path,
                               notebooks_dir=tmp_path)
    assert "configs/accelerate_ddp.yaml" in text and "# WARNING: llama2-7b's fp32 weights" in text
    assert "use --accelerate fsdp" in caplog.text
