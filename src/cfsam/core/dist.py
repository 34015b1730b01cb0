"""The distributed runtime: what the launcher asked for, the process group, wrapping, barriers."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cfsam.core.errors import UsageError


@dataclass
class Runtime:
    mode: str  # none | ddp | fsdp | zero1 | zero2 | zero3
    rank: int
    world: int
    device: torch.device
    created_group: bool


def is_zero(mode: str) -> bool:
    return mode.startswith("zero")


def deepspeed_mode() -> str:
    """The dist mode an accelerate DeepSpeed config asks for; refuses what cfsam's engine setup ignores."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    if stage not in ("1", "2", "3"):
        raise UsageError(f"ACCELERATE_DEEPSPEED_ZERO_STAGE={stage}: cfsam's trainer runs ZeRO stage 1, 2 or 3 "
                         "(stage 0 is plain data parallelism: use configs/accelerate_ddp.yaml)")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() not in ("", "none"):
        raise UsageError(f"deepspeed_config_file={os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']} is not read: "
                         "cfsam builds the engine's config from its own options; set zero_stage in the "
                         "accelerate config instead")
    for flag in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        if os.environ.get(flag, "none").lower() not in ("", "none"):
            raise UsageError(f"{flag}={os.environ[flag]} is not supported by cfsam's trainer; set it to none")
    return f"zero{stage}"


def setup_distributed(mode: str) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            mode = deepspeed_mode()
        else:
            mode = "fsdp" if use_fsdp else ("ddp" if world > 1 or dist.is_initialized() else "none")
    if is_zero(mode) and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(f"dist={mode!r} needs DeepSpeed: pip install deepspeed (the `cluster` extra)")
    if mode == "fsdp":  # what an accelerate FSDP config asks for, where it differs from what runs here
        if os.environ.get("FSDP_VERSION", "2") != "2":
            raise UsageError(f"FSDP_VERSION={os.environ['FSDP_VERSION']}: cfsam's trainer runs FSDP2 "
                             "(fully_shard); set fsdp_version: 2 in the accelerate config")
        for flag in ("FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING"):
            if os.environ.get(flag, "false").lower() == "true":
                raise UsageError(f"{flag}=true is not supported by cfsam's trainer; set it to false")
    created = False
    if mode != "none" and not dist.is_initialized():
        if "RANK" not in os.environ:
            raise UsageError(f"dist={mode!r} needs a launcher: torchrun --nproc_per_node N or accelerate launch")
        init_group()
        created = True
    rank = dist.get_rank() if mode != "none" else 0
    world = dist.get_world_size() if mode != "none" else 1
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Runtime(mode, rank, world, device, created)


def local_device() -> torch.device:
    """This process's accelerator: its rank's CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def wrap_model(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    if is_zero(rt.mode):
        return model  # deepspeed.initialize moves (and under ZeRO-3 partitions) it, with the optimizer
    model.to(rt.device)
    if rt.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # one FSDP unit per decoder layer, the root holds embeddings, final norm and the (tied) head
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        for layer in model.model.layers:
            fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def barrier(rt: Runtime) -> None:
    if rt.mode != "none":
        dist.barrier()


def rank_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_group(timeout=None) -> None:
    """The process group of a launch (torchrun, accelerate launch): NCCL on GPUs, gloo on CPUs."""
    kwargs = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **kwargs)
