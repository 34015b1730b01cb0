"""Correctness anchor and speed benchmark: cfsam.evaluation against lm-evaluation-harness, same model, same items.

    CFSAM_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_eval.py [--tasks copa:100,mmlu:120]
    CFSAM_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_eval.py --prompts   # all items, no model

lm-eval (0.4.x, offline) runs its own task definitions (``benchmarks/lm_eval_tasks/``: lm-eval's stock
prompts and utils, fed the mirror's files) through ``HFLM`` wrapping the very model object cfsam
scores, on the seeded subsample cfsam draws (lm-eval's ``samples=``). Printed per task: whether the
prompts are identical (context + continuation strings), per-item agreement of the prediction (argmax of
the summed log-likelihood: acc; per character: acc_norm), both accuracies, the largest log-likelihood
difference, and items/second of each with the ratio (wall, and CPU time since the machine is shared;
cfsam runs before and after lm-eval and its mean is used, A-B-A, against drifting load).
Targets: >= 99% agreement on every task both define the same way; cfsam >= 2x lm-eval's items/s.

The floor: the tokens cfsam's scoring actually runs through the model (``scoring.plan_rows``: every
packed row, every shared prefix once; ``scoring.forward_tokens``) at the model's forward rate, measured
in the same run (tokens/s of an inference forward of the decoder on 8 x 256 real tokens). ``% of floor``
is the floor's time over cfsam's: what padding, the head on continuation positions, small batches and
Python cost on top of the forward passes the items need. ``% of floor with head`` adds the head's work to the
floor: every continuation position (``scoring.head_positions``) at the head's rate (logits, fp32 log-softmax and
the target's entry on 1024 hidden states), measured in the same run; for a large vocabulary (Gemma 3's 262k
tied head is 168M of its 268M parameters) that work is most of a scored position's cost.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from cfsam.evaluation import harness
from cfsam.evaluation import tasks
from cfsam.data.models import load_model
from timing import Clock

HERE = Path(__file__).parent
DEFAULT = "copa:100,arc_e:100,arc_c:100,boolq:60,hellaswag:60,mmlu:120,truthfulqa_mc1:40"
LM_EVAL_NAME = {"copa": "cfsam_copa", "boolq": "cfsam_boolq", "rte": "cfsam_rte", "arc_c": "cfsam_arc_c",
                "arc_e": "cfsam_arc_e", "hellaswag": "cfsam_hellaswag", "siqa": "cfsam_siqa", "piqa": "cfsam_piqa",
                "openbookqa_fact": "cfsam_openbookqa", "race_middle": "cfsam_race_middle",
                "winogrande": "cfsam_winogrande", "truthfulqa_mc1": "cfsam_truthfulqa_mc1",
                "truthfulqa_mc2": "cfsam_truthfulqa_mc2", "mmlu": "cfsam_mmlu"}


def run_lm_eval(lm, manager, name: str, ids: list[int]) -> tuple[dict[int, dict], Clock]:
    """lm-eval on the given doc ids of one task: {doc_id: logged sample}, and the clock of its scoring."""
    from lm_eval import evaluator
    from lm_eval.tasks import get_task_dict

    task_dict = get_task_dict([LM_EVAL_NAME[name]], manager)
    with Clock() as clock:  # data loading (above) is not timed, as for cfsam
        out = evaluator.evaluate(lm, task_dict, samples={LM_EVAL_NAME[name]: ids}, log_samples=True,
                                 verbosity="ERROR")
    return {s["doc_id"]: s for s in out["samples"][LM_EVAL_NAME[name]]}, clock


def prompt_check(name: str, manager) -> str:
    """Are cfsam's (context, continuation) strings and gold answers lm-eval's, on every item? (no model needed)"""
    from lm_eval.tasks import get_task_dict

    task = get_task_dict([LM_EVAL_NAME[name]], manager)[LM_EVAL_NAME[name]]
    task.build_all_requests()
    theirs: dict[int, list] = {}
    docs = {}
    for inst in task.instances:
        theirs.setdefault(inst.doc_id, []).append(tuple(inst.args))
        docs[inst.doc_id] = inst.doc
    items, n_total = tasks.load_items(name)
    same = sum(theirs.get(it.idx) == list(zip(it.contexts, it.continuations)) for it in items)
    same_gold = 0
    for it in items:
        doc = docs[it.idx]
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        if isinstance(gold, str):
            gold = task.doc_to_choice(doc).index(gold)
        same_gold += (gold in it.gold) if isinstance(it.gold, list) else gold == it.gold
    extra = "" if len(theirs) == n_total else f" (lm-eval has {len(theirs)} docs)"
    return f"identical prompts {same}/{n_total}, identical gold {same_gold}/{n_total}{extra}"


def compare(items: list[tasks.Item], ours: dict, theirs: dict[int, dict]) -> dict:
    """Prompt identity, per-item prediction agreement and accuracies of one task."""
    same_prompt = agree = agree_norm = 0
    acc, acc_norm, dmax = [], [], 0.0
    for item, rec in zip(items, ours["records"]):
        s = theirs[rec["idx"]]
        same_prompt += [tuple(a) for a in s["arguments"]] == list(zip(item.contexts, item.continuations))
        ll = np.array([r[0] for r in s["filtered_resps"]], dtype=float)
        norm = ll / np.array([len(c) for c in item.choices])
        golds = rec["gold"] if isinstance(rec["gold"], list) else [rec["gold"]]
        agree += int(ll.argmax()) == int(np.argmax(rec["ll"]))
        agree_norm += int(norm.argmax()) == int(np.argmax(rec["ll_norm"]))
        acc.append(int(ll.argmax()) in golds)
        acc_norm.append(int(norm.argmax()) in golds)
        dmax = max(dmax, float(np.abs(ll - np.array(rec["ll"])).max()))
    n = len(items)
    return {"n": n, "same prompt": f"{same_prompt}/{n}", "agree acc %": 100 * agree / n,
            "agree acc_norm %": 100 * agree_norm / n, "acc cfsam": 100 * ours["acc"], "acc lm-eval": 100 * np.mean(acc),
            "acc_norm cfsam": 100 * ours["acc_norm"], "acc_norm lm-eval": 100 * np.mean(acc_norm),
            "max |dll|": f"{dmax:.1e}"}


def forward_rate(loaded, n: int = 8, length: int = 256, reps: int = 3) -> float:
    """Tokens/s of an inference forward of the decoder on n x length tokens of Alpaca text (median of reps)."""
    import statistics
    import time

    import torch

    from cfsam.data import formatting

    ds = formatting.build_dataset("alpaca", loaded.tokenizer, n=64, seed=0, max_length=length)
    ids = [t for row in ds["input_ids"] for t in row][:n * length]
    x = torch.tensor(ids).view(n, length)
    decoder = loaded.model.get_decoder()
    times = []
    with torch.inference_mode():
        decoder(input_ids=x[:1])
        for _ in range(reps):
            t = time.perf_counter()
            decoder(input_ids=x)
            times.append(time.perf_counter() - t)
    return n * length / statistics.median(times)


def head_rate(loaded, n: int = 1024, reps: int = 3) -> float:
    """Positions/s of the head as the harness runs it (logits, log-softmax in fp32, the target's entry) on n
    hidden states of the decoder (median of reps): what each scored position costs on top of its forward."""
    import statistics
    import time

    import torch

    head = loaded.model.get_output_embeddings()
    hidden = torch.randn(n, loaded.model.config.hidden_size, dtype=next(head.parameters()).dtype)
    target = torch.zeros(n, 1, dtype=torch.long)
    times = []
    with torch.inference_mode():
        head(hidden[:8])
        for _ in range(reps):
            t = time.perf_counter()
            head(hidden).float().log_softmax(-1).gather(1, target)
            times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def scored_tokens(loaded, items: list[tasks.Item]) -> tuple[int, int]:
    """(tokens the harness runs through the decoder, positions it runs through the head) for these items, with
    its own packing and prefix sharing."""
    from cfsam.evaluation import scoring

    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    groups, _ = scoring.group_pairs(loaded.tokenizer, pairs)
    max_len = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
    rows, _, prefix_of = scoring.plan_rows(groups, max_len, max_batch_tokens=16384)  # the harness's default
    return scoring.forward_tokens(rows, prefix_of), scoring.head_positions(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=DEFAULT,
                        help=f"task:limit,... (default {DEFAULT}); tasks with an lm-eval config: "
                             + ", ".join(LM_EVAL_NAME))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--prompts", action="store_true",
                        help="only check that every item's prompt strings and gold equal lm-eval's (all items of "
                             "the --tasks given, or of every task with a config)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    plan = {}
    for part in args.tasks.split(","):
        name, _, n = part.partition(":")
        if name not in LM_EVAL_NAME:
            raise SystemExit(f"task {name!r} has no lm-eval config here; allowed: {', '.join(LM_EVAL_NAME)}")
        plan[name] = int(n) if n else 50
    if not os.environ.get("CFSAM_DATA_DIR"):
        raise SystemExit("set CFSAM_DATA_DIR to the data mirror")
    if args.prompts:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(HERE / "lm_eval_tasks"))
        for name in [n for n in plan if n in LM_EVAL_NAME] if args.tasks != DEFAULT else LM_EVAL_NAME:
            print(f"{name:16s} {prompt_check(name, manager)}", flush=True)
        return
    loaded = load_model(args.model)

    import pandas as pd
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=args.batch_size, device="cpu")
    manager = TaskManager(include_path=str(HERE / "lm_eval_tasks"))

    def ours_run(name, limit):
        out = harness.evaluate(loaded, [name], limit=limit, seed=args.seed, batch_size=args.batch_size,
                          use_cache=False, progress=False)
        t = out["timing"]  # request building, tokenising, scoring: not data loading
        return out["tasks"][name], np.array([t["seconds"], t["cpu_seconds"]])

    rate, h_rate = forward_rate(loaded), head_rate(loaded)
    rows, totals = [], np.zeros(4)
    floor_total = head_total = 0.0
    for name, limit in plan.items():
        # A-B-A: cfsam, lm-eval, cfsam again; the mean of the two cfsam runs cancels a linear drift of load
        res, t1 = ours_run(name, limit)
        theirs, clock = run_lm_eval(lm, manager, name, [r["idx"] for r in res["records"]])
        res2, t2 = ours_run(name, limit)
        drift = max(abs(a - b) for r1, r2 in zip(res["records"], res2["records"]) for a, b in zip(r1["ll"], r2["ll"]))
        if drift > 1e-6:
            print(f"{name}: warning, cfsam's two runs differ by {drift:.1e} in log-likelihood")
        wall, cpu = (t1 + t2) / 2
        items, _ = tasks.load_items(name, limit=limit, seed=args.seed)
        tokens, positions = scored_tokens(loaded, items)
        floor = tokens / rate  # seconds the decoder's forward passes alone would take
        floor_total += floor
        head_total += positions / h_rate
        row = {"task": name, **compare(items, res, theirs),
               "items/s cfsam": res["n"] / wall, "items/s lm-eval": res["n"] / clock.wall,
               "items/s floor": res["n"] / floor, "% of floor": 100 * floor / wall,
               "% of floor with head": 100 * (floor + positions / h_rate) / wall,
               "speedup wall": clock.wall / wall, "speedup cpu": clock.cpu / cpu}
        rows.append(row)
        totals += [wall, cpu, clock.wall, clock.cpu]
        print(f"{name}: done ({res['n']} items)", flush=True)
    n = sum(r["n"] for r in rows)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.2f}".format):
        print(pd.DataFrame(rows).to_string(index=False))
    print(f"\nall {n} items: cfsam {n / totals[0]:.2f} items/s, lm-eval {n / totals[2]:.2f} items/s (wall); "
          f"speedup {totals[2] / totals[0]:.2f}x wall, {totals[3] / totals[1]:.2f}x CPU time; floor "
          f"{n / floor_total:.2f} items/s at {rate:.0f} forward tokens/s: cfsam at {100 * floor_total / totals[0]:.0f}% "
          f"of it, at {100 * (floor_total + head_total) / totals[0]:.0f}% of the floor with the head on scored positions "
          f"({h_rate:.0f} positions/s) "
          f"(model {args.model}, batch size {args.batch_size}, seed {args.seed})")


if __name__ == "__main__":
    main()
