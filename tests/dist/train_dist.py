"""train_stage under 2-process DDP and FSDP2 (gloo, CPU), for tests/test_train.py.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/train_dist.py OUT_ROOT KWARGS_JSON``
trains the same SAM stage (train_stage keyword arguments in KWARGS_JSON) into OUT_ROOT/ddp and OUT_ROOT/fsdp;
the FSDP run is stopped after step 3 (an exception from the callback, like a crash) and rerun, so it
resumes from its sharded checkpoint of step 2. The test compares both with a one-process run.
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
    train_stage("tiny", "alpaca", root / "ddp", dist="ddp", **kw)
    try:
        train_stage("tiny", "alpaca", root / "fsdp", dist="fsdp", checkpoint_every=2, callback=crash_at_3, **kw)
        raise SystemExit("the simulated crash did not happen")
    except Crash:
        pass
    metrics = train_stage("tiny", "alpaca", root / "fsdp", dist="fsdp", checkpoint_every=2, **kw)
    if dist.get_rank() == 0:
        (root / "fsdp_resumed_from.json").write_text(json.dumps(metrics["resumed_from_step"]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
