"""train_stage under 2-process DDP and FSDP2, or DeepSpeed ZeRO-2 and ZeRO-3 (gloo, CPU), for tests/test_train.py.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/train_dist.py OUT_ROOT KWARGS_JSON torch|deepspeed``
trains the same SAM stage (train_stage keyword arguments in KWARGS_JSON) twice: plainly into OUT_ROOT/ddp
(OUT_ROOT/zero2, one micro-batch per rank), and into OUT_ROOT/fsdp (OUT_ROOT/zero3, two micro-batches
per rank: accumulation inside the engine) stopped after step 3 (an exception from the callback, like a
crash) and rerun, so it resumes from its checkpoint of step 2. The test compares both with one process.
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from cfsam.training.stage import train_stage

MODES = {"torch": (("ddp", {}), ("fsdp", {})),
         "deepspeed": (("zero2", {"grad_accum": 1}), ("zero3", {"grad_accum": 2}))}


class Crash(Exception):
    pass


def crash_at_3(rec):
    if rec["step"] == 3:
        raise Crash("simulated crash after step 3")


def main(root: Path, kw: dict, mode: str):
    (plain, plain_kw), (resumed, resumed_kw) = MODES[mode]
    dist.init_process_group("gloo")
    train_stage("tiny", "alpaca", root / plain, dist=plain, **{**kw, **plain_kw})
    again = dict(dist=resumed, checkpoint_every=2, **{**kw, **resumed_kw})
    try:
        train_stage("tiny", "alpaca", root / resumed, callback=crash_at_3, **again)
        raise SystemExit("the simulated crash did not happen")
    except Crash:
        pass
    metrics = train_stage("tiny", "alpaca", root / resumed, **again)
    if dist.get_rank() == 0:
        (root / f"{resumed}_resumed_from.json").write_text(json.dumps(metrics["resumed_from_step"]))
    # leave without interpreter teardown, where a thread DeepSpeed leaves behind sometimes aborts the
    # process ("terminate called without an active exception") after the work is done
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3])
