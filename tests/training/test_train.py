"""The trainer: one-update semantics, outputs and caching, kill/resume, NaN stop, fp16, DDP/FSDP/ZeRO."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cfsam.data import formatting
from cfsam.data import models
from cfsam.core.sam import SAM
from cfsam.training.step import StepContext, TrainingDiverged, build_optimizer, optimizer_step
from cfsam.training.config import run_id
from cfsam.training.stage import train_stage

ROOT = Path(__file__).resolve().parents[2]
# 8 examples, global batch 4, 2 epochs: 4 SAM updates of the tiny model
KW = dict(optimizer="sam", lr=1e-3, epochs=2, batch_size=4, grad_accum=2, max_length=64, n_train=8, log_every=1)


@pytest.fixture(scope="module")
def tiny_batch():
    loaded = models.load_model("tiny")
    ds = formatting.build_dataset("alpaca", loaded.tokenizer, n=4, max_length=64)
    return loaded.tokenizer, [ds[i] for i in range(4)]


def _weights(d):
    return load_file(str(Path(d) / "model.safetensors"))


def test_run_id_is_a_stable_hash_of_what_changes_the_weights():
    a = run_id({"lr": 1e-3, "model": "tiny", "dataset": "alpaca"})
    assert a == run_id({"dataset": "alpaca", "model": "tiny", "lr": 0.001})  # key order does not matter
    assert a == run_id({"dataset": "alpaca", "model": "tiny", "lr": 0.001, "weight_decay": 0.0})  # = the default
    assert a == run_id({"dataset": "alpaca", "model": "tiny", "lr": 0.001, "rho": 0.5, "checkpoint_every": 3})
    assert a != run_id({"lr": 2e-3, "model": "tiny", "dataset": "alpaca"})
    assert len(a) == 16
    parent = {"model": "tiny", "dataset": "alpaca", "lr": 1e-3}
    child = {"model": parent, "dataset": "open-platypus", "optimizer": "sam"}
    assert run_id(child) != run_id({**child, "model": {**parent, "lr": 2e-3}})


@pytest.mark.parametrize("bad, match", [
    (dict(optimizer="sgd"), "optimizer='sgd'; allowed: adamw | sam"),
    (dict(lr=0), "lr=0"),
    (dict(rho=0.0), "rho=0.0"),
    (dict(rehearsal_fraction=1.5, rehearsal_from="alpaca"), "rehearsal_fraction=1.5"),
    (dict(rehearsal_fraction=0.1), "needs rehearsal_from"),
    (dict(batch_size=4, grad_accum=3), "multiple of grad_accum"),
    (dict(precision="fp8"), "precision='fp8'"),
    (dict(dist="mpi"), "dist='mpi'"),
])
def test_bad_hyper_parameters_fail_before_any_work(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train_stage("tiny", "alpaca", tmp_path, **{**KW, **bad})
    assert not any(tmp_path.iterdir())


def test_unknown_dataset_and_model_are_named(tmp_path):
    with pytest.raises(ValueError, match="dataset='mmlu': unknown training set.*alpaca"):
        train_stage("tiny", "mmlu", tmp_path, **KW)
    with pytest.raises(ValueError, match="model='gpt5': neither a model directory nor a model preset"):
        train_stage("gpt5", "alpaca", tmp_path, **KW)


def test_sam_accumulation_equals_one_big_batch(tiny_batch):
    """Two micro-batches of 2 and one batch of 4 give the same SAM update: the perturbation uses the whole
    batch's gradient and the loss is the token mean over the whole batch."""
    tok, feats = tiny_batch
    results = []
    for groups in ([feats[:2], feats[2:]], [feats]):
        model = models.load_model("tiny").model
        # SGD: the update is the gradient at the perturbed point itself (Adam's first step is ~sign(g))
        opt = SAM(model.parameters(), torch.optim.SGD, rho=2.0, lr=1.0)
        rec = optimizer_step(model, opt, [formatting.collate(g, tok.pad_token_id) for g in groups], StepContext())
        results.append((rec, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (r1, w1), (r2, w2) = results
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)
    assert r1["perturbation_norm"] == pytest.approx(2.0, rel=1e-5)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6


def test_fp16_grad_scaler_overflow_skips_then_steps(tiny_batch):
    tok, feats = tiny_batch
    model = models.load_model("tiny").model
    opt = build_optimizer(model, "sam", 1e-3, 0.0, 2.0, False)
    batch = [formatting.collate(feats, tok.pad_token_id)]
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # fp16 gradients overflow at this scale
    rec = optimizer_step(model, opt, batch, StepContext(autocast_dtype=torch.float16, scaler=scaler))
    assert rec["skipped"] and scaler.get_scale() == 2.0 ** 99
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    rec = optimizer_step(model, opt, batch, StepContext(autocast_dtype=torch.float16, scaler=scaler))
    assert not rec["skipped"] and rec["perturbation_norm"] == pytest.approx(2.0, rel=1e-5)
    assert not torch.equal(model.model.embed_tokens.weight, w0["model.embed_tokens.weight"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted SAM stage with KW, and the records its callback saw."""
    out, calls = tmp_path_factory.mktemp("full") / "stage", []
    metrics = train_stage("tiny", "alpaca", out, callback=calls.append, **KW)
    return out, metrics, calls


def test_stage_outputs_metrics_and_is_idempotent(full_run):
    out, m, calls = full_run
    assert len(calls) == 4 and m["steps"] == [1, 2, 3, 4] and m["status"] == "finished"
    assert m["perturbation_norm"] == pytest.approx([2.0] * 4, rel=1e-5)
    assert all(x > 0 for x in m["grad_norm"] + m["sam_grad_norm"]) and m["tokens_per_s"] > 0
    assert m["config"]["rho"] == 2.0 and m["data"]["dataset"] == "alpaca" and m["data"]["n_examples"] == 8
    assert m["peak_memory_bytes"] > 0 and m["wall_seconds"] >= m["train_seconds"] > 0
    reloaded = models.load_model(str(out))
    assert models.weights_hash(reloaded.model) == m["weights_hash"]
    assert not list(out.glob("checkpoint-*"))
    # the same config again: the finished run is returned, nothing trains
    assert train_stage("tiny", "alpaca", out, callback=calls.append, **KW) == m and len(calls) == 4
    with pytest.raises(ValueError, match="another config"):
        train_stage("tiny", "alpaca", out, **{**KW, "lr": 2e-3})


def test_rehearsal_mixes_stage1_examples(tmp_path):
    m = train_stage("tiny", "open-platypus", tmp_path / "r", **{**KW, "epochs": 1, "optimizer": "adamw"},
                    rehearsal_from="alpaca", rehearsal_fraction=0.2)
    # k = round(0.2 * 8 / 0.8) = 2 alpaca examples join the 8 of open-platypus
    assert m["data"]["n_rehearsal"] == 2 and m["data"]["n_examples"] == 10
    assert m["config"]["rehearsal_fraction"] == 0.2 and m["total_steps"] == 2


def test_nan_loss_stops_with_message_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    # lr 1e30: after one AdamW update the weights are ~1e30: the next loss or its gradient is not finite
    with pytest.raises(TrainingDiverged, match=r"step 2/4.*(loss is nan|non-finite gradient).*checkpoint-1"):
        train_stage("tiny", "alpaca", out, **{**KW, "optimizer": "adamw", "lr": 1e30, "warmup_ratio": 0.0},
                    checkpoint_every=1)
    assert (out / "checkpoint-1" / "trainer_state.pt").exists() and not (out / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, full_run, precision):
    """SIGKILL after step 3 (the last checkpoint is of step 2), resume, compare with an uninterrupted run bitwise:
    in fp32, and in bf16 autocast (fp32 master weights and optimizer state: a resume is exact there too)."""
    kw = {**KW, "precision": precision}
    if precision == "fp32":
        full_dir, full, _ = full_run
    else:
        full_dir = tmp_path / "full"
        full = train_stage("tiny", "alpaca", full_dir, **kw)
        assert full["config"]["precision"] == "bf16" and full["loss"] != full_run[1]["loss"]  # bf16 did run
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from cfsam.training.stage import train_stage
        def kill_at_3(rec):
            if rec["step"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        train_stage("tiny", "alpaca", {str(out)!r}, checkpoint_every=2, callback=kill_at_3, **{kw!r})
    """)
    # the same thread count as this process, whose runs it is compared with bitwise (it sets the float sum order)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "checkpoint-2").is_dir() and not (out / "metrics.json").exists()
    (out / "checkpoint-4.tmp").mkdir()  # a checkpoint that a kill interrupted mid-write is ignored
    resumed = train_stage("tiny", "alpaca", out, checkpoint_every=2, **kw)
    assert resumed["resumed_from_step"] == 2 and resumed["run_id"] == full["run_id"]
    assert resumed["loss"] == full["loss"]
    a, b = _weights(full_dir), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _two_processes_match_one(tmp_path, full_run, mode: str, kw: dict, names: tuple[str, str]):
    single_dir, single, _ = full_run
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "tests" / "dist" / "train_dist.py"), str(tmp_path), json.dumps(kw), mode],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    ref = _weights(single_dir)
    for name in names:
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["world_size"] == 2 and m["dist"] == name
        assert m["perturbation_norm"] == pytest.approx([2.0] * 4, rel=1e-5)  # global radius, not 2*sqrt(2)
        assert m["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
        assert m["sam_grad_norm"] == pytest.approx(single["sam_grad_norm"], rel=1e-4)
        w = _weights(tmp_path / name)
        assert w.keys() == ref.keys()
        # float noise is ~1e-5 here (fp32 norms of whole vs halved tensors); a perturbation of radius
        # rho*sqrt(2), or stale unperturbed ZeRO-3 weights in pass 2, move them by ~3e-3
        assert max((w[k] - ref[k]).abs().max().item() for k in ref) < 2e-4, name
    assert json.loads((tmp_path / f"{names[1]}_resumed_from.json").read_text()) == 2


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process_and_fsdp_resumes(tmp_path, full_run):
    # 2 ranks x 1 micro-batch of 2 = one process x 2 micro-batches of 2 (KW)
    _two_processes_match_one(tmp_path, full_run, "torch", {**KW, "grad_accum": 1}, ("ddp", "fsdp"))


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_match_one_process_and_zero3_resumes(tmp_path, full_run):
    """SAM around a DeepSpeed engine: the global radius rho over the ZeRO partitions, the same losses
    and (to fp32 noise) the same weights as one process on the same global batches."""
    pytest.importorskip("deepspeed")
    # zero2: 2 ranks x 1 micro-batch of 2, zero3: 2 ranks x 2 micro-batches of 1 = one process x 2 of 2 (KW)
    kw = {k: v for k, v in KW.items() if k != "grad_accum"}
    _two_processes_match_one(tmp_path, full_run, "deepspeed", kw, ("zero2", "zero3"))


def _cli(argv):
    from cfsam import cli

    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def test_cfsam_train_builds_the_same_spec_as_the_pipeline():
    from cfsam import cli
    from cfsam.pipeline import presets, specs

    p = presets.load_preset("cpu")
    exps = specs.expand("cpu")
    args = cli.build_parser().parse_args(["train", "--preset", "cpu", "--stage", "1"])
    assert run_id(cli.train_spec(args)) == run_id(exps["stage1"]["run"])
    args = cli.build_parser().parse_args(["train", "--preset", "cpu", "--stage", "2", "--optimizer", "sam",
                                          "--dataset", "open-platypus"])
    assert run_id(cli.train_spec(args)) == run_id(exps["s2-open-platypus-sam"]["run"])
    assert cli.train_spec(args)["epochs"] == p["sam"]["epochs"]
    args = cli.build_parser().parse_args(["train", "--preset", "cpu", "--stage", "2", "--rehearsal",
                                          "--dataset", "open-platypus"])
    assert run_id(cli.train_spec(args)) == run_id(exps["rehearsal-open-platypus-adamw"]["run"])
    with pytest.raises(ValueError, match="--stage"):
        cli.train_spec(cli.build_parser().parse_args(["train", "--preset", "cpu"]))


@pytest.mark.parametrize("argv, message", [
    (["--n-train", "2", "--batch-size", "4"], "n_train=2 is fewer than one batch"),
    (["--lr", "inf"], "lr=inf"),
    (["--dataset", "wiki"], "dataset='wiki': unknown training set"),
    (["--model", "gpt5"], "model='gpt5': neither a model directory nor a model preset"),
    (["--max-length", "4096"], "max_length=4096 exceeds the model's context of 1024 tokens"),
    (["--batch-size", "8", "--grad-accum", "3"], "batch_size=8 (global) must be a multiple of grad_accum=3"),
])
def test_cfsam_train_refuses_bad_values_before_loading(argv, message, capsys):
    base = {"--model": "tiny", "--dataset": "alpaca"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    from cfsam import cli

    assert cli.main(["train", *[x for kv in base.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err


def test_cli_trains_a_stage_and_merges(tmp_path, capsys):
    common = ["--n-train", "4", "--batch-size", "4", "--max-length", "64", "--max-steps", "1"]
    assert _cli(["train", "--model", "tiny", "--dataset", "alpaca", "--out", str(tmp_path / "s1"), *common]) == 0
    assert _cli(["train", "--model", str(tmp_path / "s1"), "--dataset", "open-platypus", "--optimizer", "sam",
                 "--rho", "0.5", "--rehearsal", "--out", str(tmp_path / "s2"), *common]) == 0
    m2 = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    assert m2["config"]["rho"] == 0.5 and m2["config"]["rehearsal_fraction"] == 0.1  # the documented default
    assert m2["config"]["rehearsal_from"] == "alpaca"  # what --model was trained on
    assert m2["config"]["model"]["run"] == json.loads((tmp_path / "s1" / "metrics.json").read_text())["run_id"]
    assert _cli(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--alpha", "0.25",
                 "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["alpha"] == 0.25
    assert str(tmp_path / "m") in capsys.readouterr().out


def test_accelerate_configs_parse_and_their_environment_is_honoured(tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {c: ClusterConfig.from_yaml_file(str(ROOT / "configs" / f"accelerate_{c}.yaml")).distributed_type.value
             for c in ("ddp", "fsdp", "deepspeed_zero3")}
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}
    # what `accelerate launch` exports for those configs, and the trainer's answer before any work
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    # the zero3 config is taken (here it stops at the missing launcher, or at a missing deepspeed)
    with pytest.raises(ValueError, match=r"dist='zero3' needs (a launcher|DeepSpeed)"):
        train_stage("tiny", "alpaca", tmp_path / "ds", **KW)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ValueError, match="OFFLOAD_OPTIMIZER_DEVICE=cpu is not supported.*none"):
        train_stage("tiny", "alpaca", tmp_path / "ds", **KW)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")
    with pytest.raises(ValueError, match="ZERO_STAGE=0.*accelerate_ddp.yaml"):
        train_stage("tiny", "alpaca", tmp_path / "ds", **KW)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        train_stage("tiny", "alpaca", tmp_path / "f1", **KW)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "f1").exists()


def test_snapshots_along_the_run_leave_the_run_unchanged(tmp_path, full_run):
    """Models saved at 1/4, 2/4, 3/4 of the run: the same run id and final weights as without them."""
    from cfsam.training.config import model_ref

    full_dir, full, _ = full_run  # KW: 4 steps
    m = train_stage("tiny", "alpaca", tmp_path / "snap", snapshots=4, **KW)
    assert m["run_id"] == full["run_id"]
    assert m["snapshots"] == {"snapshot-1of4": 1, "snapshot-2of4": 2, "snapshot-3of4": 3}
    final = _weights(tmp_path / "snap")
    assert all(torch.equal(final[k], v) for k, v in _weights(full_dir).items())  # saving perturbs nothing
    steps = []
    for at in (1, 2, 3):
        snap = tmp_path / "snap" / f"snapshot-{at}of4"
        steps.append(json.loads((snap / "snapshot.json").read_text())["step"])
        assert model_ref(snap) == {"run": m["run_id"], "at": at, "of": 4}
        assert not torch.equal(_weights(snap)["model.embed_tokens.weight"], final["model.embed_tokens.weight"])
    assert steps == [1, 2, 3]
