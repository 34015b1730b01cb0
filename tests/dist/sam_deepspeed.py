"""SAM, ASAM and AdamW on 2-process DeepSpeed ZeRO-1/2/3 engines (gloo, CPU) against one process.

Launched by tests/test_optim.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/sam_deepspeed.py OUT.json``.
Every rank runs the single-process reference (cfsam.core.sam.SAM / AdamW on the whole global batch);
rank 0 writes, per ZeRO stage and optimizer, the measured perturbation radii (the distance the
weights the forward reads moved, summed over the disjoint ZeRO-3 partitions), the radii ZeroSAM
reported, how far the weights were from the saved ones after restore, and the largest weight
difference from the reference.
"""
import json
import math
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from cfsam.training import zero
from cfsam.core.sam import SAM

RHO, LR, STEPS, WD = 0.5, 1e-2, 3, 0.1


def make_model():
    torch.manual_seed(0)
    # odd sizes (15 rows, 3 outputs): some parameters do not split evenly across 2 ranks (ZeRO-3 padding)
    return torch.nn.Sequential(torch.nn.Linear(6, 15), torch.nn.Tanh(), torch.nn.Linear(15, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def reference(optimizer, adaptive=False):
    """Final weights and perturbation radii of one process on the whole batches."""
    model = make_model()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    else:
        opt = SAM(model.parameters(), torch.optim.AdamW, rho=RHO, adaptive=adaptive, lr=LR, weight_decay=WD)
    radii = []
    for x, y in batches():
        loss_fn(model, x, y).backward()
        if optimizer == "adamw":
            opt.step()
            opt.zero_grad()
            continue
        before = [p.detach().clone() for p in model.parameters()]
        opt.first_step()
        radii.append(distance([p.detach() for p in model.parameters()], before, sharded=False))
        loss_fn(model, x, y).backward()
        opt.second_step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, radii


def read_weights(engine):
    """What the forward reads: per parameter the ZeRO-3 partition (its real elements), else the full tensor."""
    return [(p.ds_tensor.narrow(0, 0, zero.real_numel(p)) if hasattr(p, "ds_tensor") else p.data).detach().clone()
            for p in engine.module.parameters()]


def poison_padding(engine):
    """NaN in the padding of every ZeRO-3 partition: DeepSpeed leaves it uninitialised (torch.empty), and
    what it held decided, now and then, whether ASAM's norm was NaN. Nothing may read it."""
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):
            n = zero.real_numel(p)
            p.ds_tensor.narrow(0, n, p.ds_tensor.numel() - n).fill_(float("nan"))


def distance(a, b, sharded):
    sq = torch.as_tensor(sum((x - y).pow(2).sum() for x, y in zip(a, b)), dtype=torch.float64)
    if sharded:
        dist.all_reduce(sq)
    return math.sqrt(sq.item())


def full_weights(engine):
    out = {}
    for n, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[n] = p.detach().clone()
    return out


def run(stage, optimizer, adaptive=False):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    client = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    engine = zero.initialize(model, client, zero.engine_config(stage, 4, 1, world, None))
    poison_padding(engine)
    zsam = zero.ZeroSAM(engine, rho=RHO, adaptive=adaptive) if optimizer == "sam" else None
    radii, reported, restore_err = [], [], []
    for x, y in batches():
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        engine.backward(loss_fn(engine, xs, ys), scale_wrt_gas=False)  # DeepSpeed averages over ranks
        if zsam is not None:
            before = read_weights(engine)
            zsam.first_step()
            radii.append(distance(read_weights(engine), before, sharded=stage == 3))
            reported.append(zsam.last_perturbation_norm)
            engine.backward(loss_fn(engine, xs, ys), scale_wrt_gas=False)
            zsam.restore()
            restore_err.append(distance(read_weights(engine), before, sharded=stage == 3))
        engine.step()
    return {"radii": radii, "reported": reported, "restore_err": restore_err, "weights": full_weights(engine)}


def main(out_path):
    dist.init_process_group("gloo")
    result = {"world_size": dist.get_world_size()}
    refs = {"adamw": reference("adamw"), "sam": reference("sam"), "asam": reference("sam", adaptive=True)}
    for tag, (_, radii) in refs.items():
        result[f"reference_{tag}_radii"] = radii
    for stage in (1, 2, 3):
        for tag in ("adamw", "sam", "asam"):
            r = run(stage, "adamw" if tag == "adamw" else "sam", adaptive=tag == "asam")
            ref = refs[tag][0]
            w = r.pop("weights")
            r["max_diff"] = max((w[k] - ref[k]).abs().max().item() for k in ref)
            result[f"zero{stage}_{tag}"] = r
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    exit_without_teardown()


def exit_without_teardown():
    """Both ranks are done: leave without interpreter teardown, where a thread DeepSpeed leaves behind
    sometimes aborts the process ("terminate called without an active exception") after the work."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
