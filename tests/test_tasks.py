"""Task loading: registry YAML -> items, checked against the MANIFEST counts and lm-eval's own prompt code."""
import json
import os
from pathlib import Path

import pytest

from cfsam import tasks

# MANIFEST.md record counts of the files each task reads (arc_c: see test_arc_c_is_the_papers_295)
MANIFEST_COUNTS = {"mmlu": 14042, "race_middle": 1436, "openbookqa_fact": 500, "csl_dev": 160, "boolq": 3270,
                   "axb": 1104, "axg": 356, "rte": 277, "copa": 100, "hellaswag": 10042, "siqa": 1954,
                   "arc_e": 2376, "truthfulqa_mc1": 817, "truthfulqa_mc2": 817, "piqa": 1838, "winogrande": 1267}


def mirror(rel: str) -> Path:
    return Path(os.environ["CFSAM_DATA_DIR"]) / rel


def test_paper_categories_are_the_papers():
    assert tasks.paper_tasks() == {
        "DK": ["mmlu"],
        "Understanding": ["race_middle", "race_high", "openbookqa_fact", "csl_dev"],
        "Reasoning": ["boolq", "axb", "axg", "rte", "copa", "hellaswag", "siqa"],
        "Exams": ["arc_c"]}
    assert set(tasks.task_names("extra")) == {"truthfulqa_mc1", "truthfulqa_mc2", "arc_e", "piqa", "winogrande"}


def test_every_spec_is_complete():
    for name in tasks.task_names():
        spec = tasks.task_spec(name)
        assert spec["category"] in (*tasks.CATEGORIES, "extra"), name
        assert spec.get("primary", "acc") in tasks.PRIMARY_METRICS, name
        assert ("choices" in spec) != ("contexts" in spec), name


def test_unknown_task_names_the_allowed_ones():
    with pytest.raises(KeyError, match="unknown task 'mmlu_pro'.*allowed: .*copa"):
        tasks.check_names(["copa", "mmlu_pro"])


def test_check_names_expands_and_dedupes():
    assert tasks.check_names(["copa", "paper"])[:2] == ["copa", "mmlu"]
    assert len(tasks.check_names(["paper"])) == 13
    assert sorted(tasks.check_names(["all", "copa"])) == sorted(tasks.task_names())


def test_subsample_is_seeded_sorted_and_sized():
    a = tasks.subsample(1000, 50, 1234, "copa")
    assert a == tasks.subsample(1000, 50, 1234, "copa") == sorted(a) and len(set(a)) == 50
    assert a != tasks.subsample(1000, 50, 1235, "copa")
    assert tasks.subsample(10, None, 1, "x") == tasks.subsample(10, 20, 1, "x") == list(range(10))
    with pytest.raises(ValueError, match="limit"):
        tasks.subsample(10, 0, 1, "x")


def test_hellaswag_ctx_matches_lm_eval_preprocess():
    from lm_eval.tasks.hellaswag.utils import preprocess

    # llama.cpp line = activity_label + ": " + ctx_a + " " + ctx_b; lm-eval capitalises ctx_b
    assert tasks._hellaswag_ctx("Roof shingle removal: A man is sitting on a roof. he") == \
        preprocess("Roof shingle removal: " + "A man is sitting on a roof." + " " + "he".capitalize())
    wiki = "Home: How to paint [title] Buy paint. [step] Pick a colour."
    assert tasks._hellaswag_ctx(wiki) == preprocess(wiki)
    assert tasks._hellaswag_clean(" x [header] y  z ") == preprocess(" x [header] y  z ")


@pytest.mark.mirror
@pytest.mark.parametrize("name", sorted(MANIFEST_COUNTS))
def test_task_loads_the_manifest_record_count(name):
    items, n_total = tasks.load_items(name, limit=3)
    assert n_total == MANIFEST_COUNTS[name]
    assert len(items) == 3
    for it in items:
        n = len(it.choices)
        assert n >= 2 and len(it.contexts) == len(it.continuations) == n
        golds = it.gold if isinstance(it.gold, list) else [it.gold]
        assert all(0 <= g < n for g in golds)


@pytest.mark.mirror
def test_arc_c_is_the_papers_295():
    # the paper's ARC-c scores are multiples of 1/295: ARC-Challenge-Dev (299) minus its non-4-choice items
    lines = [json.loads(x) for x in mirror("arc/ARC-Challenge-Dev.jsonl").read_text().splitlines() if x.strip()]
    assert len(lines) == 299
    items, n_total = tasks.load_items("arc_c")
    assert n_total == 295 == sum(len(r["question"]["choices"]) == 4 for r in lines)
    assert all(len(it.choices) == 4 for it in items)
    for paper_score in (26.78, 27.12, 26.10, 63.73, 54.58, 45.08, 37.97):
        assert abs(round(paper_score * 2.95) / 2.95 - paper_score) < 0.006


@pytest.mark.mirror
def test_race_high_is_reported_missing():
    with pytest.raises(tasks.TaskMissing, match="RACE-high"):
        tasks.load_items("race_high")


@pytest.mark.mirror
def test_copa_prompts_are_lm_evals():
    from lm_eval.tasks.super_glue.copa import utils as copa

    raw = [json.loads(x) for x in mirror("superglue/COPA/val.jsonl").read_text().splitlines()]
    items, _ = tasks.load_items("copa")
    for it, doc in zip(items, raw):
        assert it.contexts == [copa.doc_to_text(doc)] * 2
        assert it.continuations == [" " + c for c in copa.doc_to_choice(doc)]  # lm-eval's " " delimiter on top
        assert it.gold == doc["label"]


@pytest.mark.mirror
def test_race_prompts_are_lm_evals_for_one_question():
    from lm_eval.tasks.race import preprocess_race as race

    raw = json.loads(mirror("race/test/middle.jsonl").read_text().splitlines()[5])
    doc = {"article": raw["article"], "problems": repr([{k: raw[k] for k in ("question", "answer", "options")}])}
    items, _ = tasks.load_items("race_middle", limit=None)
    it = items[5]
    assert it.contexts[0] == race.doc_to_text(doc)
    assert it.choices == race.doc_to_choice(doc) and it.gold == race.doc_to_target(doc)


@pytest.mark.mirror
def test_boolq_gold_follows_the_string_labels():
    raw = [json.loads(x) for x in mirror("superglue/BoolQ/val.jsonl").read_text().splitlines()]
    items, _ = tasks.load_items("boolq")
    assert [it.gold for it in items] == [int(r["label"] == "true") for r in raw]
    assert sum(it.gold for it in items) == 2033


@pytest.mark.mirror
def test_csl_dev_is_opencompass_perplexity_pair():
    items, _ = tasks.load_items("csl_dev", limit=2)
    it = items[0]
    assert it.contexts == ["", ""]  # whole texts, scored after the prefix token
    assert it.continuations[0].startswith("摘要：")
    assert it.continuations[1].startswith(it.continuations[0] + "\n关键词：")
    assert "，" in it.continuations[1]
    assert tasks.task_spec("csl_dev")["primary"] == "acc_tok"


@pytest.mark.mirror
def test_mmlu_subjects_fewshot_and_variant_labels():
    items, _ = tasks.load_items("mmlu", limit=40, num_fewshot=2)
    groups = tasks.task_spec("mmlu")["group_categories"]
    subjects = {s for members in groups.values() for s in members}
    assert len(subjects) == 57 and all(it.group in subjects for it in items)
    it = items[0]
    ctx = it.contexts[0]
    head = f"The following are multiple choice questions (with answers) about {it.group.replace('_', ' ')}.\n\n"
    assert ctx.startswith(head) and ctx.count("\nAnswer:") == 3  # two solved dev examples + the question
    dev = mirror(f"mmlu/data/dev/{it.group}_dev.csv").read_text()
    first_dev_question = dev.split(",")[0].strip('"')[:30]
    assert ctx[len(head):].startswith(first_dev_question)  # first_n from the subject's dev split
    assert tasks.variant("openbookqa_fact") and "fact" in tasks.variant("openbookqa_fact")
    assert tasks.variant("copa") is None
