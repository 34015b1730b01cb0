"""Benchmark: wall time of a loss surface against N^2 loss evaluations over the same batches.

    CFSAM_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_landscape.py [--model smollm2-135m]

Beyond its N^2 loss evaluations a surface pays for drawing two directions, one copy of the weights
and one pass over the weights per grid point. The ratio surface / (N^2 x one loss evaluation)
should be <= 1.15.

Timings on a shared machine drift, so they are taken side by side in one run: a block of N^2 loss
evaluations, the surface, and another block (A-B-A), in wall and in CPU (process) time; and, drift-
free, the surface against the loss evaluations inside it (the loss function times itself).
"""
from __future__ import annotations

import argparse
import time

from cfsam.measurement import heldout
from cfsam.measurement import landscape
from cfsam.data.models import load_model, weights_hash
from timing import Clock


class TimedLoss:
    """The response-token loss, adding up the wall seconds spent in it."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def __call__(self, model, batch):
        t = time.perf_counter()
        s, n = heldout.response_token_loss(model, batch)
        float(s)  # wait for the value (asynchronous devices)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return s, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="alpaca")
    ap.add_argument("--grid", type=int, default=5)
    ap.add_argument("--span", type=float, default=0.2)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()

    loaded = load_model(args.model)
    model = loaded.model
    batches = heldout.heldout_batches(args.data, loaded.tokenizer, n_examples=args.examples,
                                        batch_size=args.batch_size, max_length=args.max_length)
    n2 = args.grid ** 2
    before_hash = weights_hash(model)
    heldout.mean_loss(model, batches)  # warm-up: allocator, kernels

    def block():
        with Clock() as c:
            for _ in range(n2):
                heldout.mean_loss(model, batches)
        return c

    a1 = block()
    timed = TimedLoss()
    with Clock() as b:
        surf = landscape.surface(model, batches, n=args.grid, span=args.span, seed=0, loss_fn=timed, progress=False)
    a2 = block()
    assert weights_hash(model) == before_hash, "the surface did not restore the weights"

    n_params = sum(p.numel() for p in model.parameters())
    shapes = [tuple(x["input_ids"].shape) for x in batches]
    print(f"model {args.model} ({n_params / 1e6:.1f}M params), batches {shapes}, "
          f"{heldout.count_items(batches)} response tokens, grid {args.grid}x{args.grid} over +-{args.span}")
    print(f"{n2} loss evaluations before: {a1.wall:.1f} s wall, {a1.cpu:.1f} s CPU; "
          f"after: {a2.wall:.1f} s wall, {a2.cpu:.1f} s CPU")
    print(f"surface: {b.wall:.1f} s wall, {b.cpu:.1f} s CPU; centre loss {surf.center_loss:.4f}, "
          f"corner losses {surf.losses[0, 0]:.3f} .. {surf.losses[-1, -1]:.3f}")
    base_wall, base_cpu = (a1.wall + a2.wall) / 2, (a1.cpu + a2.cpu) / 2
    print(f"ratio surface / N^2 loss evaluations (A-B-A mean): wall {b.wall / base_wall:.3f}, "
          f"CPU {b.cpu / base_cpu:.3f}   target <= 1.15")
    print(f"ratio surface / its own {timed.calls} loss calls (drift-free): {b.wall / timed.seconds:.3f}")


if __name__ == "__main__":
    main()
