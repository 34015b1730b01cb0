"""Paired bootstrap comparisons of runs and the claims registry, on synthetic per-item records."""
import numpy as np
import pandas as pd
import pytest

from cfsam.analysis import claims
from cfsam.evaluation import metrics
from cfsam.evaluation import tasks
from cfsam.pipeline import cache
from cfsam.pipeline import specs
from cfsam.core.io import write_json_atomic


def _records(name: str, rng, n: int, p_correct: float) -> list[dict]:
    """Two-choice items (gold 0) of equal length: acc follows p_correct, the log-likelihoods are random."""
    spec = tasks.task_spec(name)
    groups = ["abstract_algebra", "anatomy", "virology", "sociology", "marketing"] if spec.get("aggregate") else [None]
    out = []
    for i in range(n):
        ok = float(rng.random() < p_correct)
        ll = [-5.0 - rng.random(), -5.0 - rng.random()]
        rec = {"idx": i, "acc": ok, "acc_norm": ok, "acc_tok": ok, "gold": 0, "ll": ll,
               "ll_norm": [x / 10 for x in ll], "n_tokens": [3, 3], "group": groups[i % len(groups)]}
        if spec.get("primary") == "mc2":
            rec["mc2"] = float(rng.random())
        out.append(rec)
    return out


def _lower_gold(recs: dict, by: float) -> dict:
    return {n: [{**r, "ll": [r["ll"][0] - by, *r["ll"][1:]],
                 "ll_norm": [(r["ll"][0] - by) / 10, *r["ll_norm"][1:]]} for r in v] for n, v in recs.items()}


def _entry(task_records: dict[str, list[dict]]) -> dict:
    res = {"tasks": {n: metrics.task_result(n, recs, len(recs)) for n, recs in task_records.items()}}
    res["categories"] = metrics.categories(res)
    return {"eval": res, "heldout_loss": {}}


PAPER_TASKS = [n for names in tasks.paper_tasks().values() for n in names if n != "race_high"]


def test_point_estimate_is_the_papers_avg_arithmetic():
    rng = np.random.default_rng(0)
    entries = [_entry({n: _records(n, rng, 20, p) for n in PAPER_TASKS}) for p in (0.3, 0.6)]
    point, boots = claims.avg_with_bootstrap(entries, n_boot=50)
    # the same AVG evaluate.categories computed (MMLU as the mean of its subjects, race_high missing)
    assert point == pytest.approx([e["eval"]["categories"]["AVG"]["score"] for e in entries], abs=1e-12)
    assert boots.shape == (50, 2)


def test_identical_runs_differ_by_zero():
    rng = np.random.default_rng(1)
    recs = {n: _records(n, rng, 15, 0.5) for n in PAPER_TASKS}
    point, boots = claims.avg_with_bootstrap([_entry(recs), _entry(recs)], "gold_choice_logprob", n_boot=200)
    assert point[1] - point[0] == 0 and np.all(boots[:, 1] == boots[:, 0])


def test_gold_log_prob_among_choices_by_hand():
    rec = {"ll": [-10.0, -20.0], "ll_norm": [-1.0, -1.0], "n_tokens": [2, 4], "gold": 0}
    assert claims.choice_logprob(rec, "acc") == pytest.approx(-np.log1p(np.exp(-10)))  # by sums
    assert claims.choice_logprob(rec, "acc_tok") == pytest.approx(np.log(0.5))  # -5 a token each: a tie
    assert claims.choice_logprob(rec, "acc_norm") == pytest.approx(np.log(0.5))  # -1 a character each
    # per character -1 and -2 over 10 characters each: scores -10 and -20 at the mean length
    rec2 = {"ll": [-10.0, -20.0], "ll_norm": [-1.0, -2.0], "n_tokens": [1, 1], "gold": [0, 1]}
    assert claims.choice_logprob(rec2, "acc_norm") == pytest.approx(0.0)  # both choices are gold


def test_paired_interval_matches_the_normal_formula_for_one_task():
    # One task present: AVG is its mean, and the paired interval's half-width is ~1.96 sd(d) / sqrt(n).
    rng = np.random.default_rng(2)
    n = 400
    a = _records("copa", rng, n, 0.5)
    b = [{**r, "ll": [r["ll"][0] + rng.normal(0.1, 0.5), r["ll"][1]]} for r in a]
    _, boots = claims.avg_with_bootstrap([_entry({"copa": a}), _entry({"copa": b})], "gold_choice_logprob",
                                         n_boot=4000, seed=3)
    d = np.array([claims.choice_logprob(y, "acc") - claims.choice_logprob(x, "acc") for x, y in zip(a, b)])
    lo, hi = np.percentile(boots[:, 1] - boots[:, 0], [2.5, 97.5])
    assert (hi - lo) / 2 == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(n), rel=0.1)
    assert lo < d.mean() < hi


def test_runs_scored_on_different_items_are_refused():
    rng = np.random.default_rng(3)
    a = _records("copa", rng, 10, 0.5)
    b = [{**r, "idx": r["idx"] + 100} for r in a]
    with pytest.raises(ValueError, match="different items"):
        claims.avg_with_bootstrap([_entry({"copa": a}), _entry({"copa": b})])


def test_verdicts_by_hand():
    assert claims.verdict(0.2, 1.0, "up") == "reproduced"
    assert claims.verdict(-1.0, -0.2, "up") == "opposite"
    assert claims.verdict(-1.0, -0.2, "down") == "reproduced"
    assert claims.verdict(-0.1, 0.3, "down") == "inconclusive"
    assert claims.verdict(np.nan, np.nan, "up") == "not run"


def test_claims_expand_over_the_presets_datasets_and_sizes():
    by_id = {c["id"]: c for c in claims.registry()}
    assert claims.pairs_of(by_id["forgetting"], "cpu") == [("stage1", "s2-metamathqa-adamw"),
                                                           ("stage1", "s2-open-platypus-adamw"),
                                                           ("stage1", "s2-sharegpt-adamw"),
                                                           ("stage1", "s2-auto-wiki-adamw")]  # the preset's order
    # the paper's SAM claims are on ShareGPT, Open-Platypus and MetaMathQA; Auto-Wiki is its task-gap set only
    assert claims.pairs_of(by_id["sam-mitigates"], "cpu") == [("s2-metamathqa-adamw", "s2-metamathqa-sam"),
                                                              ("s2-open-platypus-adamw", "s2-open-platypus-sam"),
                                                              ("s2-sharegpt-adamw", "s2-sharegpt-sam")]
    assert claims.claim_sets({"stage2": ["sharegpt"]}, ["auto-wiki", "sharegpt"]) == ["sharegpt"]
    assert claims.claim_sets({}, ["auto-wiki", "sharegpt"]) == ["auto-wiki", "sharegpt"]
    # the cpu preset's second size, Gemma 3 270M: its own AdamW-against-SAM pair
    assert claims.pairs_of(by_id["sam-across-sizes"], "cpu") == [
        ("s2-open-platypus-adamw", "s2-open-platypus-sam"),  # the preset's own model is a size too
        ("gemma3-270m/s2-open-platypus-adamw", "gemma3-270m/s2-open-platypus-sam")]
    assert len(claims.pairs_of(by_id["sam-across-sizes"], "paper")) == 3  # Llama2-7B, TinyLlama-1.1B, Llama2-13B
    assert claims.pairs_of(by_id["sam-across-sizes"], "smoke") == []  # one model: no claim across sizes
    for claim in claims.registry():  # every name a claim compares is an experiment of the presets
        for preset in ("cpu", "paper"):
            assert {n for p in claims.pairs_of(claim, preset) for n in p} <= set(specs.expand(preset)), claim["id"]
    with pytest.raises(ValueError, match="unknown claim.*allowed: forgetting"):
        claims.check("cpu", ["sam-is-magic"])


def test_a_claim_on_an_unknown_set_names_it_and_the_allowed_ones(monkeypatch):
    from cfsam.core import registry as registry_

    real = registry_.entries
    bad = {"x": {"id": "x", "pairs": [["stage1", "s2-{stage2}-adamw"]], "stage2": ["wikitext"]}}
    monkeypatch.setattr(registry_, "entries", lambda kind: bad if kind == "claims" else real(kind))
    claims.registry.cache_clear()
    try:
        with pytest.raises(registry_.RegistryError, match="unknown dataset 'wikitext'; allowed: .*sharegpt"):
            claims.registry()
    finally:
        monkeypatch.undo()
        claims.registry.cache_clear()


def test_check_reads_the_cache_and_reports_missing_runs_as_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    rng = np.random.default_rng(4)
    recs = {n: _records(n, rng, 30, 0.5) for n in PAPER_TASKS}
    worse = _lower_gold(recs, 3.0)
    for name, r, loss in (("s2-open-platypus-adamw", recs, 2.0), ("s2-auto-wiki-adamw", worse, 2.5)):
        exp = specs.expand("cpu")[name]
        entry = {**_entry(r), "id": specs.experiment_id(exp), "name": name, "spec": exp,
                 "provenance": {"data": cache.data_hashes(exp)},
                 "heldout_loss": {"alpaca": {"loss": loss}, "auto-wiki": {"loss": 1.0}}}
        write_json_atomic(tmp_path / "cpu" / f"{name}.json", entry)
    table = claims.check("cpu", ["task-gap", "sam-mitigates"], n_boot=200)
    gap = table.loc["task-gap"]
    assert gap["Δ gold log-prob among choices (nats)"] < -1.0
    assert gap["verdict (Δ gold log-prob among choices)"] == "reproduced"
    assert gap["verdict (Δ AVG)"] == "inconclusive"  # same accuracies: Δ AVG exactly 0
    assert table.loc["sam-mitigates", "verdict (Δ AVG)"] == "not run"
    assert gap["held-out stage-1 loss: pairs the paper's way"] == "1 of 1"  # 2.0 -> 2.5: more forgotten
    assert table.loc["sam-mitigates", "held-out stage-1 loss: pairs the paper's way"] == "–"
    pairs = claims.compare_pairs("cpu", [("s2-open-platypus-adamw", "s2-auto-wiki-adamw")], n_boot=50)
    assert pairs.iloc[0][claims.HELDOUT] == pytest.approx(0.5)
    assert gap[f"verdict ({claims.HELDOUT.split(' (')[0]})"] == "no interval"  # means only: no per-example losses


def test_heldout_loss_interval_is_a_paired_bootstrap_over_the_examples(tmp_path, monkeypatch):
    """Per-example held-out losses give the stage-1 loss an interval: a constant rise of 0.5 nats per token
    in every example is 0.5 in every replicate (a point interval), and noise gives an interval around the
    ratio of sums computed by hand; a lower loss is the paper's way for a claim that b keeps more."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    rng = np.random.default_rng(5)
    recs = {n: _records(n, rng, 10, 0.5) for n in PAPER_TASKS}
    tokens = rng.integers(5, 50, size=40).astype(float)
    base = rng.uniform(1.5, 2.5, size=40) * tokens
    noisy = base + rng.normal(0.0, 0.3, size=40) * tokens
    runs = {"s2-metamathqa-adamw": base + 0.5 * tokens, "s2-metamathqa-sam": base,
            "s2-open-platypus-adamw": base, "s2-open-platypus-sam": noisy}
    for name, summed in runs.items():
        exp = specs.expand("cpu")[name]
        pe = np.stack([summed, tokens], axis=1)
        entry = {**_entry(recs), "id": specs.experiment_id(exp), "name": name, "spec": exp,
                 "provenance": {"data": cache.data_hashes(exp)},
                 "heldout_loss": {"alpaca": {"loss": summed.sum() / tokens.sum(), "per_example": pe.tolist()}}}
        write_json_atomic(tmp_path / "cpu" / f"{name}.json", entry)
    pairs = claims.compare_pairs("cpu", [("s2-metamathqa-adamw", "s2-metamathqa-sam"),
                                         ("s2-open-platypus-adamw", "s2-open-platypus-sam")], n_boot=400)
    h = claims.HELDOUT
    shift = pairs.loc["s2-metamathqa-adamw → s2-metamathqa-sam"]
    assert shift[h] == pytest.approx(-0.5) and shift[f"{h} low"] == pytest.approx(-0.5) and shift[f"{h} high"] == pytest.approx(-0.5)
    noise = pairs.loc["s2-open-platypus-adamw → s2-open-platypus-sam"]
    assert noise[h] == pytest.approx((noisy.sum() - base.sum()) / tokens.sum())
    assert noise[f"{h} low"] < noise[h] < noise[f"{h} high"]
    pooled = pairs.loc["pooled (mean of pairs)"]
    assert pooled[h] == pytest.approx((shift[h] + noise[h]) / 2)
    # one draw of the examples for both pairs: the pooled replicates are (-0.5 + the noisy pair's) / 2
    assert pooled[f"{h} low"] == pytest.approx((-0.5 + noise[f"{h} low"]) / 2)
    table = claims.check("cpu", ["sam-mitigates"], n_boot=400)
    row = table.loc["sam-mitigates"]  # SAM's loss is lower: the paper's way, where the interval excludes zero
    expected = "reproduced" if pooled[f"{h} high"] < 0 else "inconclusive"
    assert row[f"verdict ({h.split(' (')[0]})"] == expected
    assert "by Δ held-out stage-1 loss: " in claims.summary(table)


def test_learning_beside_each_claim_marks_a_keeper_that_learned_less(tmp_path, monkeypatch):
    """b's own-set loss gets a paired interval like the stage-1 loss: SAM's MetaMathQA loss 0.3 nats per token
    above AdamW's in every example is +0.3 in every replicate. SAM then "keeps more" of Alpaca (its loss 0.5
    lower) only while learning less of the same set, so ``sam-mitigates`` is marked confounded and the book's
    sentence sends the reader to the matched-learning view; the ``forgetting`` claim (stage 1 → AdamW) compares
    different starting points, and AdamW learning more there is the claim, not a confound."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    from cfsam.analysis import book

    rng = np.random.default_rng(6)
    recs = {n: _records(n, rng, 10, 0.5) for n in PAPER_TASKS}
    tokens = rng.integers(5, 50, size=30).astype(float)
    base = rng.uniform(1.5, 2.5, size=30) * tokens
    runs = {  # (Alpaca summed losses, MetaMathQA summed losses)
        "stage1": (base, base + 1.0 * tokens),
        "s2-metamathqa-adamw": (base + 0.5 * tokens, base),
        "s2-metamathqa-sam": (base, base + 0.3 * tokens),
    }
    for name, (alpaca, math) in runs.items():
        exp = specs.expand("cpu")[name]
        entry = {**_entry(recs), "id": specs.experiment_id(exp), "name": name, "spec": exp,
                 "provenance": {"data": cache.data_hashes(exp)},
                 "heldout_loss": {ds: {"loss": s.sum() / tokens.sum(), "per_example": np.stack([s, tokens], 1).tolist()}
                                  for ds, s in (("alpaca", alpaca), ("metamathqa", math))}}
        write_json_atomic(tmp_path / "cpu" / f"{name}.json", entry)
    L = claims.LEARNED
    pair = claims.compare_pairs("cpu", [("s2-metamathqa-adamw", "s2-metamathqa-sam")], n_boot=300).iloc[0]
    assert pair[L] == pytest.approx(0.3) and pair[f"{L} low"] == pytest.approx(0.3)
    assert pair["same stage-2 set"]
    table = claims.check("cpu", ["forgetting", "sam-mitigates"], n_boot=300)
    sam, forgetting = table.loc["sam-mitigates"], table.loc["forgetting"]
    assert sam["learning"] == "b learned less" and sam["confounded by learning"]
    assert sam[f"verdict ({claims.HELDOUT.split(' (')[0]})"] == "reproduced"  # 0.5 nats lower, in every replicate
    assert forgetting[L] == pytest.approx(-1.0) and forgetting["learning"] == "b learned more"
    assert not forgetting["confounded by learning"]  # stage 1 has no stage-2 set of its own
    sentence = book.claims_sentence("cpu", "Table 2(a)")
    assert ("`s2-{stage2}-sam` learned less of its own set than `s2-{stage2}-adamw`, held-out loss Δ +0.300 nats, "
            "95 % CI [+0.300, +0.300]), so it may keep more only because it learned less") in sentence
    assert "`s2-{stage2}-adamw` learned more of its own set than `stage1`" in sentence
    # the claim's learning without intervals (entries without per-example losses) says so, and flags nothing
    assert claims.learning(pd.Series({L: 0.3}), "up") == {L: 0.3, f"{L} 95% CI": "–", "learning": "no interval",
                                                         "confounded by learning": False}
    assert (sam["pairs"], sam["pairs computed"]) == (3, 1)  # MetaMathQA alone of the preset's three SAM sets
    assert book.verdicts_sentence(table).startswith(
        "Reproduced by any measure: forgetting, sam-mitigates (of which sam-mitigates only with the run said to keep "
        "more learning clearly less of its set")


def test_a_claim_at_every_size_is_reproduced_only_where_every_size_reproduces_it(tmp_path, monkeypatch):
    """``sam-across-sizes`` (``every``): SAM's Alpaca loss 0.5 nats per token below AdamW's on SmolLM2 and 0.2
    above it on Gemma. Pooled, that is -0.15 in every replicate, "reproduced"; size by size, one reproduces and
    one is opposite, so the claim "at every size" is inconclusive, and the sentence names each size's verdict."""
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path))
    from cfsam.analysis import book

    rng = np.random.default_rng(7)
    recs = {n: _records(n, rng, 10, 0.5) for n in PAPER_TASKS}
    tokens = rng.integers(5, 50, size=20).astype(float)
    base = rng.uniform(1.5, 2.5, size=20) * tokens
    runs = {"s2-open-platypus-adamw": base, "s2-open-platypus-sam": base - 0.5 * tokens,
            "gemma3-270m/s2-open-platypus-adamw": base, "gemma3-270m/s2-open-platypus-sam": base + 0.2 * tokens}
    for name, alpaca in runs.items():
        exp = specs.expand("cpu")[name]
        entry = {**_entry(recs), "id": specs.experiment_id(exp), "name": name, "spec": exp,
                 "provenance": {"data": cache.data_hashes(exp)},
                 "heldout_loss": {"alpaca": {"loss": alpaca.sum() / tokens.sum(),
                                             "per_example": np.stack([alpaca, tokens], 1).tolist()}}}
        write_json_atomic(tmp_path / "cpu" / f"{name}.json", entry)
    h = claims.verdict_column(claims.HELDOUT)
    pooled = claims.compare_pairs("cpu", claims.pairs_of(
        {c["id"]: c for c in claims.registry()}["sam-across-sizes"], "cpu"), n_boot=200).loc["pooled (mean of pairs)"]
    assert pooled[claims.HELDOUT] == pytest.approx(-0.15) and pooled[f"{claims.HELDOUT} high"] == pytest.approx(-0.15)
    row = claims.check("cpu", ["sam-across-sizes"], n_boot=200).loc["sam-across-sizes"]
    assert row[claims.HELDOUT] == pytest.approx(-0.15) and row[h] == "inconclusive"  # not the pooled "reproduced"
    assert row["per pair"] == ("smollm2-135m (`s2-open-platypus-sam`) inconclusive by Δ AVG, reproduced by held-out "
                               "Alpaca loss; gemma3-270m (`gemma3-270m/s2-open-platypus-sam`) inconclusive by Δ AVG, "
                               "opposite by held-out Alpaca loss")  # the same items in all four runs: Δ AVG exactly 0
    assert "at every size, as the paper claims it: smollm2-135m (`s2-open-platypus-sam`) inconclusive" in (
        book.claims_sentence("cpu", "Table 2(b)"))
    # the first page: pooled, the loss would say "reproduced"; the sizes disagree, so the claim is named nowhere
    page = book.tables_findings("cpu")
    assert page.startswith("**On the paper's own tables**, where each method runs at one fixed recipe "
                           "(AdamW for 2 epochs, SAM at rho 2 for 1;")  # the cpu preset's recipe
    assert "Reproduced by any measure: sam-mitigates;" in page  # by its Open-Platypus pair
    assert "sam-across-sizes" not in page
