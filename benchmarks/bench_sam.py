"""SAM against AdamW: now part of bench_train.py, which measures them (and SAM every k) side by side on
real Alpaca batches at the study's shape, with throughput, FLOP/s, memory and padding.

    .venv/bin/python benchmarks/bench_sam.py [bench_train.py's options]
"""
import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("bench_train.py")), run_name="__main__")
