"""The headline experiments of a preset's frontier, in the order a short lease should compute them, one a line:
the base model, stage 1, then on the first frontier set and seed the AdamW runs (every lr of its grid), SAM
at stage 2's lr (every rho), and SAM at every other lr of AdamW's grid (``frontier.method_lr``).

    python scripts/offline_gpu/headline.py --preset h200 > .gpu/c3/only.txt
"""
from __future__ import annotations

import argparse
import re
import sys

from cfsam.pipeline import presets, specs


def headline(preset: str) -> list[str]:
    frontier = presets.load_preset(preset)["frontier"]
    ds, seed = frontier["datasets"][0], frontier["seeds"][0]
    needed = specs.needed(preset, ["frontier"])
    point, num = rf"-s{seed}-\d+of\d+$", r"[0-9.e-]+?"  # numbers as names write them: 0.05, 5e-05
    groups = [[n for n in needed if n in ("base", "frontier-stage1")],
              [n for n in needed if re.match(rf"^{re.escape(ds)}-adamw-lr{num}{point}", n)],
              [n for n in needed if re.match(rf"^{re.escape(ds)}-sam-rho{num}{point}", n)],
              [n for n in needed if re.match(rf"^{re.escape(ds)}-sam-rho{num}-lr{num}{point}", n)]]
    if not all(groups[:3]):
        raise SystemExit(f"preset {preset!r}: no base/stage-1, AdamW or SAM frontier runs on {ds} seed {seed} "
                         f"among the frontier chapter's experiments")
    return [n for g in groups for n in g]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="h200")
    args = p.parse_args(argv)
    print("\n".join(headline(args.preset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
