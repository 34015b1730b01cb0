"""Peak memory of what ``run-missing`` does in one process, against a training step alone.

    CFSAM_DATA_DIR=... .venv/bin/python benchmarks/bench_memory.py [--preset cpu]
        [--experiment metamathqa-sam-rho2-s1234-4of4] [--optimizer sam] [--eval-limit N]

Every row is a fresh process (so its ``ru_maxrss`` is its own) that loads the model and then does one
thing at the experiment's real shapes (its ``measure`` spec, from ``specs.expand``):

* ``train step``: one update of the optimizer on the longest batch of the study's stage-1 epoch
  (8 x <= 256 tokens), the floor (as ``bench_train.py``'s memory rows);
* ``heldout``, ``eval``, ``landscape``, ``curvature``: one measurement phase each;
* ``run-missing``: ``train_stage`` (two updates, so every buffer of training exists) and then
  ``runner.measure`` twice, as two experiments in one process are, with the peak and the resident
  set after each step (a resident set that grows between experiments is something kept alive).

Memory does not depend on machine load, but run it alone anyway: the eval phase takes minutes.
The last printed line is the summary (target: run-missing peak <= 1.5 x the training step's).
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile

from cfsam.core import memory

MB = 2 ** 20
PHASES = ("train step", "heldout", "eval", "landscape", "curvature", "run-missing")


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:

    from cfsam.data import models
    from cfsam.measurement import curvature, heldout, landscape
    from cfsam.pipeline import runner
    from cfsam.pipeline.specs import expand

    spec = expand(args.preset)[args.experiment]["measure"]
    if args.eval_limit:
        spec["eval"]["limit"] = args.eval_limit
    h, ls = spec["heldout"], spec.get("landscape")
    marks = {}
    if args.worker == "run-missing":
        from cfsam.training.stage import train_stage

        with tempfile.TemporaryDirectory() as out:
            train_stage("smollm2-135m", h["datasets"][-1], out, n_train=16, batch_size=8, max_length=h["max_length"],
                        optimizer=args.optimizer, rho=2.0, lr=1e-5, seed=1234, group_by_length=True)
            marks["after training"] = (peak(), memory.resident_bytes())
            for k in (1, 2):
                runner.measure(out, spec)
                gc.collect()
                marks[f"after measuring ({k})"] = (peak(), memory.resident_bytes())
        return {"peak_rss": peak(), "marks": marks}
    loaded = models.load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    marks["loaded"] = (peak(), memory.resident_bytes())
    if args.worker == "train step":
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        from bench_train import longest_batch, make_optimizer

        from cfsam.training.step import StepContext, optimizer_step

        mb = longest_batch(tok, 8, h["max_length"])
        opt = make_optimizer(model, args.optimizer, 1)
        optimizer_step(model, opt, [mb], StepContext(max_grad_norm=1.0))
    elif args.worker == "heldout":
        for ds in h["datasets"]:
            b = heldout.heldout_batches(ds, tok, n_examples=h["n"], batch_size=8, max_length=h["max_length"],
                                        seed=h["seed"])
            heldout.per_example_losses(model, b)
    elif args.worker == "eval":
        from cfsam.evaluation.harness import evaluate

        evaluate(loaded, spec["eval"]["tasks"], limit=spec["eval"]["limit"], seed=spec["eval"]["seed"])
    else:
        b = heldout.heldout_batches(ls["dataset"], tok, n_examples=ls["n_examples"], batch_size=ls["batch_size"],
                                    max_length=h["max_length"], seed=h["seed"], skip=h["n"])
        if args.worker == "landscape":
            landscape.flatness_of(model, b, ls)
        else:
            curvature.curvature_of(model, b, ls)
    return {"peak_rss": peak(), "marks": marks}


def run_phase(args, phase: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", phase, "--preset", args.preset, "--experiment", args.experiment,
           "--optimizer", args.optimizer, "--eval-limit", str(args.eval_limit or 0)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--experiment", default="metamathqa-sam-rho2-s1234-4of4")
    ap.add_argument("--optimizer", default="sam", choices=["adamw", "sam"])
    ap.add_argument("--eval-limit", type=int, default=0, help="items per task (0: the experiment's own)")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = {}
    for phase in args.phases:
        rows[phase] = r = run_phase(args, phase)
        marks = "; ".join(f"{k}: peak {p / MB:.0f} MB, resident {c / MB:.0f} MB" for k, (p, c) in r["marks"].items())
        print(f"{phase:12s} peak {r['peak_rss'] / MB:7.0f} MB   ({marks})", flush=True)
    if "train step" in rows and "run-missing" in rows:
        ratio = rows["run-missing"]["peak_rss"] / rows["train step"]["peak_rss"]
        print(f"SUMMARY {args.preset}/{args.experiment} ({args.optimizer}): run-missing process peak "
              f"{rows['run-missing']['peak_rss'] / MB:.0f} MB = {ratio:.2f} x one training step's "
              f"{rows['train step']['peak_rss'] / MB:.0f} MB (target <= 1.5)")


if __name__ == "__main__":
    main()
