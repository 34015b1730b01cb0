"""The harness: packed scoring against a naive forward and lm-eval, metrics by hand, the paper's arithmetic."""
import json
import math
import os

import numpy as np
import pytest
import torch

from cfsam.evaluation import harness
from cfsam.evaluation import metrics
from cfsam.evaluation import scoring
from cfsam.evaluation import tasks

PAIRS = [("The cat sat on the", " mat"), ("The cat sat on the", " dog, and then it slept"), ("Hello there ", "friend"),
         ("", "An unconditional text"), ("Question: what?\nAnswer:", " A"), ("Question: what?\nAnswer:", " B"),
         ("A much longer context " * 30, " and its end"), ("x", " y z w v u")]


def naive_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """One sequence, one plain full forward, log-softmax over all positions: no packing, no batching."""
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_packed_batched_scoring_matches_naive_forward(tiny):
    encoded = scoring.encode_pairs(tiny.tokenizer, PAIRS)
    tiny.model.train()
    # tiny batches and a small token budget: several batches, and long groups split across rows
    got = scoring.loglikelihoods(tiny.model, tiny.tokenizer, PAIRS, batch_size=3, max_batch_tokens=40)
    assert tiny.model.training  # the caller's mode is restored
    tiny.model.eval()
    for (ctx, cont), (ll, n) in zip(encoded, got):
        assert n == len(cont)
        assert ll == pytest.approx(naive_loglikelihood(tiny.model, ctx, cont), abs=1e-4)


def test_plain_rows_take_the_causal_path_and_agree(tiny):
    # one-token answers (MMLU-like) and single continuations: rows of different lengths, no custom mask
    pairs = [("Q" * k + "? Answer:", c) for k in (1, 7, 30) for c in (" A", " B")] + [("Short", " and one longer end")]
    got = scoring.loglikelihoods(tiny.model, tiny.tokenizer, pairs, batch_size=4)
    for (ctx, cont), (ll, _) in zip(scoring.encode_pairs(tiny.tokenizer, pairs), got):
        assert ll == pytest.approx(naive_loglikelihood(tiny.model, ctx, cont), abs=1e-4)


def test_prefix_aliases_by_hand():
    assert scoring.prefix_aliases([[1, 2], [1, 2, 3], [1, 2, 3, 4], [5]]) == {1: 2, 0: 2}
    assert scoring.prefix_aliases([[1, 2], [1, 2]]) == {}  # equal continuations are each scored


def test_continuation_that_prefixes_another_is_read_off_it_and_agrees(tiny):
    # csl_dev's shape: an empty-ish context, "text" and "text + more" as the two choices
    pairs = [("A", " the abstract of a paper"), ("A", " the abstract of a paper, with keywords"),
             ("A", " the abstract"), ("B", " other")]
    encoded = scoring.encode_pairs(tiny.tokenizer, pairs)
    assert encoded[1][1][:len(encoded[0][1])] == encoded[0][1]  # the shape under test
    for kwargs in ({}, {"max_batch_tokens": 8}):  # also with the longer continuation split off in its own row
        got = scoring.loglikelihoods(tiny.model, tiny.tokenizer, pairs, **kwargs)
        for (ctx, cont), (ll, n) in zip(encoded, got):
            assert n == len(cont)
            assert ll == pytest.approx(naive_loglikelihood(tiny.model, ctx, cont), abs=1e-4)


def test_shared_prefixes_runs():
    pre = list(range(100, 140))  # 40 shared tokens
    ctxs = [pre + [1, 2], [7, 8, 9], pre + [3], pre[:20] + [5] * 30, pre + [4, 4, 4]]
    assert scoring.shared_prefixes(ctxs, min_len=32) == [40, 0, 40, 0, 40]
    assert scoring.shared_prefixes([pre, pre], min_len=32) == [39, 39]  # each keeps a token of its own
    assert scoring.shared_prefixes(ctxs, min_len=41) == [0] * 5


def test_forward_tokens_of_a_plan_by_hand():
    pre = list(range(100, 140))  # 40 shared tokens
    groups = [(pre + [1, 2], [[5], [6, 7]]), (pre + [3], [[5, 6, 7]]), ([7, 8, 9], [[1], [2, 3]])]
    rows, where, prefix_of = scoring.plan_rows(groups, max_len=1024, max_batch_tokens=4096)
    assert rows == [([1, 2], [[5], [6, 7]]), ([3], [[5, 6, 7]]), ([7, 8, 9], [[1], [2, 3]])]
    assert where == [(0, [0, 1]), (1, [0]), (2, [0, 1])]
    # rows: 2 + 0 + 1, 1 + 2, 3 + 0 + 1 (a continuation's last token is never input); the prefix once: 40
    assert scoring.forward_tokens(rows, prefix_of) == 3 + 3 + 4 + 40
    assert scoring.head_positions(rows) == (1 + 2) + 3 + (1 + 2)  # every continuation token, once


def test_shared_prefix_is_computed_once_and_agrees(tiny):
    primer = "Q: What is human life expectancy? A: 78 years.\n\nQ: Who was president in 1955? A: Eisenhower.\n\n"
    pairs = [(primer + f"Q: question {i}{'?' * i}\nA:", c) for i in range(4) for c in (" Yes it is", " No", " Maybe")]
    encoded = scoring.encode_pairs(tiny.tokenizer, pairs)
    assert min(scoring.shared_prefixes([c for c, _ in encoded])) >= 32
    got = scoring.loglikelihoods(tiny.model, tiny.tokenizer, pairs + [("unrelated", " x y")], batch_size=2)
    for (ctx, cont), (ll, _) in zip(encoded, got):
        assert ll == pytest.approx(naive_loglikelihood(tiny.model, ctx, cont), abs=1e-4)


def test_overlong_context_is_left_truncated_like_lm_eval(tiny):
    model, tok = tiny.model, tiny.tokenizer
    ctx, cont = scoring.encode_pairs(tok, [("word " * 1500, " end")])[0]
    max_len = model.config.max_position_embeddings
    assert len(ctx) + len(cont) > max_len + 1
    (ll, _), = scoring.loglikelihoods(model, tok, [("word " * 1500, " end")])
    full = (ctx + cont)[-(max_len + 1):]  # lm-eval: keep the last max_length + 1 tokens
    assert ll == pytest.approx(naive_loglikelihood(model, full[:-len(cont)], cont), abs=1e-4)


def test_encode_and_scores_match_lm_eval_hflm(tiny):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=4, device="cpu")
    for (ctx, cont), ours in zip(PAIRS, scoring.encode_pairs(tiny.tokenizer, PAIRS)):
        if ctx:
            assert tuple(map(list, lm._encode_pair(ctx, cont))) == ours
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)]
    theirs = [r[0] for r in lm.loglikelihood(reqs, disable_tqdm=True)]
    ours = [ll for ll, _ in scoring.loglikelihoods(tiny.model, tiny.tokenizer, PAIRS)]
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_score_item_by_hand():
    item = tasks.Item(0, ["q"] * 3, [" aa", " b", " ccccc"], ["aa", "b", "ccccc"], 2)
    ll, n_tok = [-1.0, -0.8, -2.0], [4, 1, 2]
    rec = metrics.score_item(item, ll, n_tok, "acc")
    assert rec["pred"] == 1 and rec["acc"] == 0.0                    # argmax of the sums
    assert rec["ll_norm"] == pytest.approx([-0.5, -0.8, -0.4])       # per character of the choice (lm-eval)
    assert rec["acc_norm"] == 1.0
    assert rec["acc_tok"] == 0.0                                     # per token: -0.25, -0.8, -1.0
    assert metrics.score_item(item, ll, n_tok, "acc_norm")["pred"] == 2
    assert rec["gold_logprob"] == -2.0
    z = math.log(math.exp(-1) + math.exp(-0.8) + math.exp(-2))
    assert rec["gold_choice_logprob"] == pytest.approx(-2.0 - z)
    mc2 = metrics.score_item(tasks.Item(0, ["q"] * 3, ["a", "b", "c"], ["a", "b", "c"], [0, 2]), ll, n_tok, "mc2")
    p = np.exp(ll)
    assert mc2["mc2"] == pytest.approx((p[0] + p[2]) / p.sum()) and mc2["acc"] == 0.0


def test_task_metrics_and_stderr_by_hand():
    recs = [{"idx": i, "acc": a, "acc_norm": 1.0, "acc_tok": 0.0, "gold_logprob": g, "gold_choice_logprob": 0.0,
             "group": None} for i, (a, g) in enumerate([(1.0, -1.0), (0.0, -3.0), (1.0, -2.0), (1.0, -2.0)])]
    res = metrics.task_result("copa", recs, 100)
    assert res["acc"] == 0.75 and res["score"] == 0.75 and res["n"] == 4 and res["n_total"] == 100
    assert res["acc_stderr"] == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    assert res["gold_logprob"] == -2.0


# The paper's own per-task numbers average to its category numbers (Tables 5 and 6 -> Table 2).
TABLE5_ALPACA = {"mmlu": (31.60, 43.03, 47.23, 43.94), "race_middle": 55.22, "race_high": 55.22,
                 "openbookqa_fact": 66.4, "csl_dev": 58.13, "boolq": 78.29, "axb": 59.42, "axg": 60.67, "rte": 61.37,
                 "copa": 65.00, "hellaswag": 65.00, "siqa": 53.53, "arc_c": 45.08}
TABLE2_ALPACA = {"DK": 40.53, "Understanding": 58.74, "Reasoning": 63.33, "Exams": 45.08, "AVG": 51.92}
TABLE6_TINYLLAMA = {"mmlu": (22.18, 24.03, 22.88, 23.84), "race_middle": 22.91, "race_high": 21.90,
                    "openbookqa_fact": 25.80, "csl_dev": 51.88, "boolq": 43.98, "axb": 45.56, "axg": 50.28,
                    "rte": 52.71, "copa": 53.00, "hellaswag": 43.91, "siqa": 33.67, "arc_c": 26.78}
TABLE2_TINYLLAMA = {"DK": 23.16, "Understanding": 30.62, "Reasoning": 46.16, "Exams": 26.78, "AVG": 31.68}
TABLE5_SHAREGPT_WO_EP2 = {"mmlu": (22.69, 29.72, 23.57, 29.20), "race_middle": 50.7, "race_high": 47.4,
                          "openbookqa_fact": 57, "csl_dev": 56.25, "boolq": 75.20, "axb": 57.70, "axg": 50.00,
                          "rte": 47.65, "copa": 60.00, "hellaswag": 73.81, "siqa": 46.42, "arc_c": 45.76}
TABLE2_SHAREGPT_WO = {"DK": 26.08, "Understanding": 52.84, "Reasoning": 58.68, "Exams": 45.76, "AVG": 45.84}


def paper_results(row: dict) -> dict:
    groups = tasks.task_spec("mmlu")["group_categories"]
    out = {}
    for name, v in row.items():
        if name == "mmlu":
            # each subject at its category's value: the macro mean over subjects is then the paper's DK
            subjects = {s: v[i] for i, members in enumerate(groups.values()) for s in members}
            score, subcats = metrics.aggregate_groups(subjects, groups)
            out[name] = {"status": "ok", "score": score, "subcategories": subcats}
        else:
            out[name] = {"status": "ok", "score": v}
    return {"tasks": out}


@pytest.mark.parametrize("row,expected", [(TABLE5_ALPACA, TABLE2_ALPACA), (TABLE6_TINYLLAMA, TABLE2_TINYLLAMA),
                                          (TABLE5_SHAREGPT_WO_EP2, TABLE2_SHAREGPT_WO)])
def test_categories_reproduce_the_papers_arithmetic(row, expected):
    cats = metrics.categories(paper_results(row))
    for cat, value in expected.items():
        assert cats[cat]["score"] == pytest.approx(value, abs=0.006), cat
        assert cats[cat]["complete"]
    assert cats["MMLU"] == pytest.approx(dict(zip(["STEM", "Humanities", "Social Sciences", "Other"], row["mmlu"])))
    assert list(cats["Understanding"]["tasks"]) == ["race_middle", "race_high", "openbookqa_fact", "csl_dev"]


def test_missing_tasks_are_listed_never_dropped_silently():
    res = paper_results(TABLE5_ALPACA)
    res["tasks"]["race_high"] = {"status": "missing", "reason": "RACE-high is not in the mirror"}
    del res["tasks"]["siqa"]
    cats = metrics.categories(res)
    u = cats["Understanding"]
    assert u["missing"] == {"race_high": "RACE-high is not in the mirror"} and not u["complete"]
    assert u["score"] == pytest.approx(np.mean([55.22, 66.4, 58.13]))
    assert cats["Reasoning"]["missing"] == {"siqa": "not evaluated"}
    assert not cats["AVG"]["complete"] and cats["AVG"]["missing"] == []
    del res["tasks"]["arc_c"]
    assert metrics.categories(res)["AVG"]["missing"] == ["Exams"]


def test_unknown_task_fails_before_any_model_is_loaded():
    with pytest.raises(KeyError, match="unknown task 'hellaswagg'"):
        harness.evaluate("no-such-model-is-loaded", ["copa", "hellaswagg"])


def test_evaluate_tiny_end_to_end_with_cache(tiny, tmp_path, manifest):
    res = harness.evaluate(tiny, ["copa", "race_high", "arc_c"], limit=6, cache_dir=tmp_path, progress=False)
    assert res["tasks"]["race_high"]["status"] == "missing"
    copa = res["tasks"]["copa"]
    n_total = manifest.records("superglue/COPA/val.jsonl")  # the mirror: 100
    assert copa["n"] == 6 and copa["n_total"] == n_total and len(copa["records"]) == 6
    for rec in copa["records"]:
        assert len(rec["ll"]) == 2 and rec["pred"] == int(np.argmax(rec["ll"]))
    assert copa["acc"] == pytest.approx(np.mean([r["pred"] == r["gold"] for r in copa["records"]]))
    arc = res["tasks"]["arc_c"]
    assert arc["primary"] == "acc_norm" and arc["score"] == arc["acc_norm"]
    assert "race_high" in res["categories"]["Understanding"]["missing"]
    json.dumps(res)  # JSON-able
    assert len(list(tmp_path.glob("*.json"))) == 2
    again = harness.evaluate(tiny, ["copa", "arc_c"], limit=6, cache_dir=tmp_path, progress=False)
    assert again["timing"]["items"] == 0 and again["tasks"]["copa"]["records"] == copa["records"]
    other = harness.evaluate(tiny, ["copa"], limit=5, cache_dir=tmp_path, progress=False)  # other settings: new key
    assert other["timing"]["items"] == 5 and len(list(tmp_path.glob("*.json"))) == 3


def test_cli_prints_tables_and_writes_json(tmp_path, capsys):
    from cfsam import cli

    out = tmp_path / "r.json"
    args = cli.build_parser().parse_args(["eval", "--model", "tiny", "--tasks", "copa,race_high", "--limit", "4", "--out", str(out),
                              "--cache-dir", str(tmp_path / "cache")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "copa" in printed and "MISSING" in printed and "Understanding" in printed and "AVG" in printed
    assert json.loads(out.read_text())["tasks"]["copa"]["n"] == 4


@pytest.mark.slow
@pytest.mark.mirror
def test_smollm2_copa_matches_lm_eval():
    # lm-eval 0.4.13 (benchmarks/lm_eval_tasks/cfsam_copa.yaml, HFLM on this model) scores 64/100 here
    from cfsam.data.models import load_model

    res = harness.evaluate(load_model("smollm2-135m"), ["copa"], use_cache=False, progress=False)
    assert res["tasks"]["copa"]["n"] == 100
    assert res["tasks"]["copa"]["acc"] == pytest.approx(0.64)


def _dp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cfsam.data.models import load_model

    tiny = load_model("tiny")
    lls = scoring.loglikelihoods(tiny.model, tiny.tokenizer, PAIRS, batch_size=2)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(lls, f)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_ranks_agree_with_one_process(tiny, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_dp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = scoring.loglikelihoods(tiny.model, tiny.tokenizer, PAIRS)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert [g[0] for g in got] == pytest.approx([s[0] for s in single], abs=1e-4)
