"""A device self-check: before a machine computes a study, it measures a few numbers of the base model that
a committed entry computed elsewhere holds (the cpu preset's ``base``), and compares them.

The H200 entries of 2026-11-30 ended every held-out response with the wrong EOS (transformers 5.17's GGUF
tokenizer; issue 26): their held-out losses were ~9 nats an example too high while their eval
log-likelihoods agreed. So both are checked, per example and per choice, on the reference's own settings:

* held-out: each of the first ``n_examples`` examples of a set: its number of response tokens (equal) and
  its mean response-token loss (within ``tol``);
* eval: each choice of the first ``n_items`` items of a task: its token count (equal) and its
  log-likelihood per token (within ``tol``; the two machines agreed to 5e-5);
* the weights hash and the tokenizer's EOS (the model config's).

``TOL`` = 1e-3 nats a token: fp32 on an accelerator and on a CPU differ by about 1e-5 here, bf16 weights by
about 2e-3, the wrong EOS by 0.05 to 1.5. The result is a JSON-able dict, written by ``python -m
cfsam.measurement.selfcheck`` to the file that ``CFSAM_DEVICE_CHECK`` names, which the runner copies into
the provenance of every entry it writes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from cfsam.core.errors import UsageError
from cfsam.core.io import read_json, write_json_atomic

log = logging.getLogger(__name__)

TOL = 1e-3
DATASETS = ("alpaca", "metamathqa", "auto-wiki")
TASKS = ("copa", "arc_c", "boolq")
SHOWN = 5  # disagreements named in the message


def read_reference(path: str | Path, datasets=DATASETS, tasks=TASKS) -> dict:
    """A committed entry of a base model holding what the check compares, or ValueError saying what is missing."""
    ref = read_json(path)
    if not isinstance(ref, dict) or set(ref.get("spec", {}).get("run", {})) != {"model"}:
        raise UsageError(f"{path}: not an entry of a base model (its spec.run must be {{'model': ...}})")
    missing = [f"heldout_loss.{d}.per_example" for d in datasets
               if "per_example" not in ref.get("heldout_loss", {}).get(d, {})]
    missing += [f"eval.tasks.{t}.records" for t in tasks if not ref.get("eval", {}).get("tasks", {}).get(t, {}).get("records")]
    if missing:
        have_d, have_t = sorted(ref.get("heldout_loss", {})), sorted(ref.get("eval", {}).get("tasks", {}))
        raise UsageError(f"{path} lacks {', '.join(missing)}; it holds held-out sets {', '.join(have_d) or 'none'} "
                         f"and tasks {', '.join(have_t) or 'none'}")
    return ref


def measure(ref: dict, *, datasets=DATASETS, n_examples: int = 8, tasks=TASKS, n_items: int = 8,
            model: str | None = None) -> dict:
    """The numbers the check compares, measured here (on the accelerator when there is one), in fp32."""
    from cfsam.core.dist import local_device
    from cfsam.data import models
    from cfsam.evaluation import tasks as tasks_
    from cfsam.evaluation.scoring import loglikelihoods
    from cfsam.measurement import heldout

    if n_examples < 1 or n_items < 1:
        raise UsageError(f"n_examples={n_examples}, n_items={n_items}; each must be at least 1")
    loaded = models.load_model(model or ref["spec"]["run"]["model"])
    net, tok = loaded.model.eval().to(local_device()), loaded.tokenizer
    h, ev = ref["spec"]["measure"]["heldout"], ref["spec"]["measure"]["eval"]
    out = {"weights_hash": models.weights_hash(net), "eos_token_id": tok.eos_token_id,
           "config_eos_token_id": getattr(net.config, "eos_token_id", None), "heldout": {}, "eval": {}}
    for ds in datasets:
        # the runner's batches (MEASURE_BATCH a batch, right padding): the first n of its seeded order are these
        batches = heldout.heldout_batches(ds, tok, n_examples=min(n_examples, h["n"]), batch_size=heldout.MEASURE_BATCH,
                                          max_length=h["max_length"], seed=h["seed"])
        out["heldout"][ds] = heldout.per_example_losses(net, batches)
    for task in tasks:
        items, _ = tasks_.load_items(task, limit=ev["limit"], seed=ev["seed"], stratify=bool(ev.get("stratified")))
        items = items[:n_items]
        pairs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
        scored = iter(loglikelihoods(net, tok, pairs, progress=False))
        out["eval"][task] = [{"idx": it.idx, "ll": [next(scored) for _ in it.contexts]} for it in items]
    return out


def compare(measured: dict, ref: dict, *, tol: float = TOL) -> dict:
    """{"passed", "checks": {name: {"n", "max_gap", "passed"}}, "failures": [messages]}."""
    checks, failures = {}, []

    def record(name, gaps, problems):
        worst = max(gaps, default=0.0)
        ok = not problems and worst <= tol
        checks[name] = {"n": len(gaps), "max_gap": worst, "passed": ok}
        failures.extend(problems)

    ref_hash = ref.get("provenance", {}).get("model_weights_hash")
    record("weights", [], [] if ref_hash in (None, measured["weights_hash"]) else
           [f"weights hash {measured['weights_hash']} here, {ref_hash} in the reference"])
    record("eos", [], [] if measured["eos_token_id"] == measured["config_eos_token_id"] else
           [f"the tokenizer's EOS is id {measured['eos_token_id']}, the model config's {measured['config_eos_token_id']}"])
    for ds, got in measured["heldout"].items():
        want = ref["heldout_loss"][ds]["per_example"][:len(got)]
        gaps, problems = [], []
        for i, ((s, n), (t, m)) in enumerate(zip(got, want)):
            if n != m:
                problems.append(f"held-out {ds} example {i}: {n} response tokens here, {m} in the reference")
            elif n:
                gaps.append(abs(s / n - t / m))
                if gaps[-1] > tol:
                    problems.append(f"held-out {ds} example {i}: mean loss {s / n:.5f} here, {t / m:.5f} in the "
                                    f"reference ({n} tokens)")
        record(f"heldout:{ds}", gaps, problems)
    for task, got in measured["eval"].items():
        want = {r["idx"]: r for r in ref["eval"]["tasks"][task]["records"]}
        gaps, problems = [], []
        for item in got:
            r = want.get(item["idx"])
            if r is None:
                problems.append(f"{task} item {item['idx']} is not among the reference's items")
                continue
            for k, ((ll, n), ll_ref, n_ref) in enumerate(zip(item["ll"], r["ll"], r["n_tokens"])):
                if n != n_ref:
                    problems.append(f"{task} item {item['idx']} choice {k}: {n} tokens here, {n_ref} in the reference")
                    continue
                gaps.append(abs(ll - ll_ref) / max(n, 1))
                if gaps[-1] > tol:
                    problems.append(f"{task} item {item['idx']} choice {k}: log-likelihood {ll:.5f} here, "
                                    f"{ll_ref:.5f} in the reference ({n} tokens)")
        record(f"eval:{task}", gaps, problems)
    return {"passed": all(c["passed"] for c in checks.values()), "tol": tol, "checks": checks, "failures": failures}


def self_check(reference: str | Path, *, datasets=DATASETS, n_examples: int = 8, tasks=TASKS, n_items: int = 8,
               tol: float = TOL, model: str | None = None) -> dict:
    """Measure here, compare with the reference entry; the result with where it ran and against what."""
    import transformers

    start = time.time()
    ref = read_reference(reference, datasets, tasks)
    result = compare(measure(ref, datasets=datasets, n_examples=n_examples, tasks=tasks, n_items=n_items,
                             model=model), ref, tol=tol)
    prov = ref.get("provenance", {})
    result.update(reference={"path": str(reference), "id": ref["id"], "git_commit": prov.get("git_commit"),
                             "device": prov.get("machine", {}).get("device")},
                  machine={"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__, "transformers": transformers.__version__},
                  seconds=round(time.time() - start, 1))
    return result


def summary(result: dict) -> str:
    worst = max((c["max_gap"] for c in result["checks"].values()), default=0.0)
    head = (f"device self-check {'passed' if result['passed'] else 'FAILED'} on {result['machine']['device']} "
            f"against {result['reference']['path']} ({result['reference']['device']}): largest gap {worst:.2g} "
            f"a token, tolerance {result['tol']:g}")
    if result["passed"]:
        return head
    bad = [n for n, c in result["checks"].items() if not c["passed"]]
    shown = result["failures"][:SHOWN]
    more = len(result["failures"]) - len(shown)
    return "\n  ".join([head + f"; failing: {', '.join(bad)}", *shown] + ([f"... and {more} more"] if more else []))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cfsam.measurement.selfcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("reference", help="a committed entry of the base model, e.g. results/cpu/base.json.gz")
    p.add_argument("--out", help="write the result (JSON) here; the runner copies it into provenance when "
                                 "CFSAM_DEVICE_CHECK names this file")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--n-examples", type=int, default=8)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--n-items", type=int, default=8)
    p.add_argument("--tol", type=float, default=TOL)
    args = p.parse_args(argv)
    try:
        result = self_check(args.reference, datasets=args.datasets, n_examples=args.n_examples, tasks=args.tasks,
                            n_items=args.n_items, tol=args.tol)
    except (ValueError, OSError) as err:
        print(f"device self-check could not run: {err}", file=sys.stderr)
        return 2
    if args.out:
        write_json_atomic(args.out, result)
    print(summary(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
