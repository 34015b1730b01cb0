"""SAM under 2-process DDP, FSDP1, FSDP2 and flat-partition sharding (the FSDP1 / ZeRO layout by hand), on gloo.

Launched by tests/test_optim.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/sam_sharded.py OUT.json``.
Every rank runs the same single-process reference on the whole global batch; rank 0 writes the
measured perturbation radii and the largest weight difference from the reference to OUT.json.
"""
import json
import math
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullStateDictConfig, StateDictType, fully_shard
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from cfsam.core.sam import SAM

RHO, LR, STEPS = 0.5, 1e-2, 3


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def batches(world):
    """STEPS global batches of 8 rows, split evenly across ranks (equal sizes: mean of means = mean)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        out.append((x, y))
    return out


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def global_dist(before, params, replicated=False):
    """||w - w0||: the local norm for replicated weights (DDP), else summed over disjoint shards."""
    sq = sum((local(p).detach() - b).pow(2).sum() for p, b in zip(params, before))
    sq = torch.as_tensor(sq, dtype=torch.float32)
    if not replicated:
        dist.all_reduce(sq)
    return math.sqrt(sq.item())


def reference(adaptive):
    model = make_model()
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=RHO, adaptive=adaptive, lr=LR, weight_decay=0.1)
    radii = []
    for x, y in batches(1):
        loss_fn(model, x, y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        sam.first_step()
        radii.append(math.sqrt(sum((p.detach() - b).pow(2).sum().item() for p, b in zip(model.parameters(), before))))
        loss_fn(model, x, y).backward()
        sam.second_step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, radii


def run_wrapped(wrap, adaptive=False, sharded=None):
    """Train a wrapped model on this rank's half of each global batch; return (radii, final full weights)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = wrap(make_model())
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=RHO, adaptive=adaptive, sharded=sharded, lr=LR,
              weight_decay=0.1)
    radii, reported = [], []
    for x, y in batches(world):
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        loss_fn(model, xs, ys).backward()
        params = list(model.parameters())
        before = [local(p).detach().clone() for p in params]
        sam.first_step()
        radii.append(global_dist(before, params, replicated=wrap is DDP))
        reported.append(sam.last_perturbation_norm)
        loss_fn(model, xs, ys).backward()
        sam.second_step()
    return radii, reported, full_weights(model)


def full_weights(model):
    if isinstance(model, FSDP1):  # its parameters are flat shards: gather the original ones
        with FSDP1.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {n.removeprefix("module."): full(p).detach().clone() for n, p in model.named_parameters()}


def fsdp1(model):
    return FSDP1(model, device_id=torch.device("cpu"))


def fsdp2(model):
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def run_flat_partition(sharded, adaptive=False):
    """FSDP1/ZeRO layout by hand: the flattened, padded parameter vector is split into contiguous
    partitions, rank r owns partition r and its slice of the averaged gradient (a reduce-scatter)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    n = flat.numel()
    per = math.ceil(n / world)
    padded = torch.cat([flat, flat.new_zeros(per * world - n)])
    shard = padded[rank * per:(rank + 1) * per].clone().requires_grad_(True)
    sam = SAM([shard], torch.optim.AdamW, rho=RHO, adaptive=adaptive, sharded=sharded, lr=LR, weight_decay=0.1)

    def gathered():
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard.detach())
        return torch.cat(parts)[:n]

    def shard_grad(x, y):
        torch.nn.utils.vector_to_parameters(gathered(), model.parameters())
        model.zero_grad()
        loss_fn(model, x, y).backward()
        g = torch.nn.utils.parameters_to_vector(p.grad for p in model.parameters())
        g = torch.cat([g, g.new_zeros(per * world - n)])
        dist.all_reduce(g)
        shard.grad = (g / world)[rank * per:(rank + 1) * per].clone()

    radii = []
    for x, y in batches(world):
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        shard_grad(xs, ys)
        before = shard.detach().clone()
        sam.first_step()
        radii.append(global_dist([before], [shard]))
        shard_grad(xs, ys)
        sam.second_step()
    torch.nn.utils.vector_to_parameters(gathered(), model.parameters())
    return radii, {k: v.detach().clone() for k, v in model.named_parameters()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b)


def main(out_path):
    dist.init_process_group("gloo")
    result = {}
    for adaptive in (False, True):
        ref, ref_radii = reference(adaptive)
        tag = "asam" if adaptive else "sam"
        result[f"{tag}_reference_radii"] = ref_radii
        for name, wrap in (("ddp", DDP), ("fsdp1", fsdp1), ("fsdp2", fsdp2)):
            # FSDP1's flat shards are plain tensors: the caller says they are sharded
            radii, reported, weights = run_wrapped(wrap, adaptive=adaptive, sharded=True if wrap is fsdp1 else None)
            result[f"{tag}_{name}"] = {"radii": radii, "reported": reported, "max_diff": max_diff(weights, ref)}
        radii, weights = run_flat_partition(sharded=True, adaptive=adaptive)
        result[f"{tag}_flat_sharded"] = {"radii": radii, "max_diff": max_diff(weights, ref)}
    # the per-shard norm of SAM ports that ignore sharding: radius rho * sqrt(world_size)
    radii, _, _ = run_wrapped(fsdp2, sharded=False)
    result["sam_fsdp2_per_shard"] = {"radii": radii}
    radii, _ = run_flat_partition(sharded=False)
    result["sam_flat_per_shard"] = {"radii": radii}
    result["world_size"] = dist.get_world_size()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
