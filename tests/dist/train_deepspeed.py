"""train_stage under 2-process DeepSpeed ZeRO-2 and ZeRO-3 (gloo, CPU), for tests/test_train.py.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/train_deepspeed.py OUT_ROOT KWARGS_JSON``
trains the same SAM stage (train_stage keyword arguments in KWARGS_JSON, without grad_accum) into
OUT_ROOT/zero2 with one micro-batch per rank and OUT_ROOT/zero3 with two (gradient accumulation
inside the engine, in both SAM passes); the ZeRO-3 run is stopped after step 3 (an exception from
the callback, like a crash) and rerun, so it resumes from the engine's checkpoint of step 2. The
test compares both with a one-process run.
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from cfsam.train import train_stage


class Crash(Exception):
    pass


def crash_at_3(rec):
    if rec["step"] == 3:
        raise Crash("simulated crash after step 3")


def main(root: Path, kw: dict):
    dist.init_process_group("gloo")
    train_stage("tiny", "alpaca", root / "zero2", dist="zero2", grad_accum=1, **kw)
    z3 = dict(dist="zero3", grad_accum=2, checkpoint_every=2, **kw)
    try:
        train_stage("tiny", "alpaca", root / "zero3", callback=crash_at_3, **z3)
        raise SystemExit("the simulated crash did not happen")
    except Crash:
        pass
    metrics = train_stage("tiny", "alpaca", root / "zero3", **z3)
    if dist.get_rank() == 0:
        (root / "zero3_resumed_from.json").write_text(json.dumps(metrics["resumed_from_step"]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
