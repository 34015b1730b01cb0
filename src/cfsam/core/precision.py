"""Which precision this machine trains in natively, for a preset's ``precision: auto``.

bf16 autocast where the hardware has bf16 arithmetic: a CUDA device that supports it, or a CPU with
AVX512-BF16 or AMX-BF16 (there a bf16 matmul runs about 3x fp32; ``benchmarks/bench_train.py`` measures a
step). Elsewhere fp32: a CPU without them emulates bf16 and runs it slower than fp32. The value chosen goes
into every run's spec and id (``presets.load_preset`` resolves it), so runs trained in different precisions
never share a cache entry or a result. Master weights, optimizer state and SAM's perturbation stay fp32.
"""
from __future__ import annotations

from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def auto_precision(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """``"bf16"`` where this machine's accelerator (or, without one, its CPU) has native bf16, else ``"fp32"``."""
    import torch  # only here: the presets and specs that call this are torch-free otherwise

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS) else "fp32"
