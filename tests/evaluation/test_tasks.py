"""Task loading: registry YAML -> items, checked against the MANIFEST counts and lm-eval's own prompt code;
the Hub path against the mirror path, on mirror records rewritten by hand into the Hub's schemas."""
import ast
import json
import os
from pathlib import Path

import datasets
import pytest
import yaml

from cfsam.data import hub, sources
from cfsam.evaluation import tasks

# The file each task reads, whose record count MANIFEST.md lists (the mirror's: mmlu 14042 in its grouped row,
# race_middle 1436, openbookqa 500, csl_dev 160, boolq 3270, axb 1104, axg 356, rte 277, copa 100, hellaswag 10042,
# siqa 1954, arc_e 2376, truthfulqa 817, piqa 1838, winogrande 1267; arc_c: see test_arc_c_is_the_papers_295)
MMLU_ROW = "mmlu/data/{dev,val,test}/*.csv"
TASK_FILES = {"mmlu": MMLU_ROW, "race_middle": "race/test/middle.jsonl", "openbookqa_fact": "openbookqa/openbook_qa.jsonl",
              "csl_dev": "csl_fewclue/dev_few_all.json", "boolq": "superglue/BoolQ/val.jsonl",
              "axb": "superglue/AX-b/AX-b.jsonl", "axg": "superglue/AX-g/AX-g.jsonl", "rte": "superglue/RTE/val.jsonl",
              "copa": "superglue/COPA/val.jsonl", "hellaswag": "hellaswag/hellaswag_val_full.txt.bz2",
              "siqa": "siqa/dev.jsonl", "arc_e": "arc/ARC-Easy-Test.jsonl", "truthfulqa_mc1": "truthfulqa/mc_task.json",
              "truthfulqa_mc2": "truthfulqa/mc_task.json", "piqa": "piqa/dev.jsonl", "winogrande": "winogrande/winogrande.jsonl"}


def manifest_count(manifest, name: str) -> int:
    rel = TASK_FILES[name]
    return manifest.split_records(rel, "test") if rel == MMLU_ROW else manifest.records(rel)


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


def test_stratified_subsample_spreads_evenly_over_groups():
    from collections import Counter
    groups = ["a"] * 100 + ["b"] * 50 + ["c"] * 2 + ["d"] * 30
    pick = tasks.stratified_subsample(groups, 41, 1234, "mmlu")
    assert pick == sorted(set(pick)) and len(pick) == 41
    assert pick == tasks.stratified_subsample(groups, 41, 1234, "mmlu")
    n = Counter(groups[i] for i in pick)
    # c has only 2: the other 39 spread over a, b, d as 13 each (by hand)
    assert n == {"a": 13, "b": 13, "c": 2, "d": 13}
    # fewer items than groups: one each from a seeded choice of groups
    few = Counter(groups[i] for i in tasks.stratified_subsample(groups, 3, 1234, "mmlu"))
    assert sorted(few.values()) == [1, 1, 1]
    assert tasks.stratified_subsample(groups, None, 1, "x") == list(range(len(groups)))
    with pytest.raises(ValueError, match="limit"):
        tasks.stratified_subsample(groups, 0, 1, "x")


def test_mmlu_items_are_stratified_by_subject(manifest):
    from collections import Counter
    items, n = tasks.load_items("mmlu", limit=200)  # the fixtures hold 4 test items per subject: 228 in all
    per = Counter(it.group for it in items)
    assert n == manifest_count(manifest, "mmlu") and len(items) == 200
    assert len(per) == 57 and set(per.values()) == {3, 4}  # 200 = 57 * 3 + 29
    assert tasks.sampling("mmlu") == "stratified" and tasks.sampling("copa") == "random"


def test_hellaswag_ctx_matches_lm_eval_preprocess():
    from lm_eval.tasks.hellaswag.utils import preprocess

    # llama.cpp line = activity_label + ": " + ctx_a + " " + ctx_b; lm-eval capitalises ctx_b
    assert tasks._hellaswag_ctx("Roof shingle removal: A man is sitting on a roof. he") == \
        preprocess("Roof shingle removal: " + "A man is sitting on a roof." + " " + "he".capitalize())
    wiki = "Home: How to paint [title] Buy paint. [step] Pick a colour."
    assert tasks._hellaswag_ctx(wiki) == preprocess(wiki)
    assert tasks._hellaswag_clean(" x [header] y  z ") == preprocess(" x [header] y  z ")


@pytest.mark.parametrize("name", sorted(TASK_FILES))
def test_task_loads_the_manifest_record_count(name, manifest):
    items, n_total = tasks.load_items(name, limit=3)
    assert n_total == manifest_count(manifest, name)
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


def test_race_high_is_reported_missing():
    with pytest.raises(tasks.TaskMissing, match="RACE-high"):
        tasks.load_items("race_high")


def test_copa_prompts_are_lm_evals():
    from lm_eval.tasks.super_glue.copa import utils as copa

    raw = [json.loads(x) for x in mirror("superglue/COPA/val.jsonl").read_text().splitlines()]
    items, _ = tasks.load_items("copa")
    for it, doc in zip(items, raw):
        assert it.contexts == [copa.doc_to_text(doc)] * 2
        assert it.continuations == [" " + c for c in copa.doc_to_choice(doc)]  # lm-eval's " " delimiter on top
        assert it.gold == doc["label"]


def test_race_prompts_are_lm_evals_for_one_question():
    from lm_eval.tasks.race import preprocess_race as race

    raw = json.loads(mirror("race/test/middle.jsonl").read_text().splitlines()[5])
    doc = {"article": raw["article"], "problems": repr([{k: raw[k] for k in ("question", "answer", "options")}])}
    items, _ = tasks.load_items("race_middle", limit=None)
    it = items[5]
    assert it.contexts[0] == race.doc_to_text(doc)
    assert it.choices == race.doc_to_choice(doc) and it.gold == race.doc_to_target(doc)


def test_boolq_gold_follows_the_string_labels():
    raw = [json.loads(x) for x in mirror("superglue/BoolQ/val.jsonl").read_text().splitlines()]
    items, _ = tasks.load_items("boolq")
    assert [it.gold for it in items] == [int(r["label"] == "true") for r in raw]
    assert 0 < sum(it.gold for it in items) < len(items)  # both answers occur


@pytest.mark.mirror
def test_boolq_has_its_known_number_of_yes_answers():
    assert sum(it.gold for it in tasks.load_items("boolq")[0]) == 2033


def test_csl_dev_is_opencompass_perplexity_pair():
    items, _ = tasks.load_items("csl_dev", limit=2)
    it = items[0]
    assert it.contexts == ["", ""]  # whole texts, scored after the prefix token
    assert it.continuations[0].startswith("摘要：")
    assert it.continuations[1].startswith(it.continuations[0] + "\n关键词：")
    assert "，" in it.continuations[1]
    assert tasks.task_spec("csl_dev")["primary"] == "acc_tok"


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


# ----------------------------------------------------------------------------------- the Hub fallback
# No download is possible here: each mirror record is rewritten BY HAND into its Hub set's schema (as on the
# dataset card and in lm-eval's task config for that Hub id), served by a stand-in for datasets.load_dataset,
# and the Hub path (the registry's `hub.fields`) must give back the mirror path's items.
def _winogrande_doc(r: dict) -> dict:
    c0, c1 = r["context_options"]  # sentence up to the blank + option
    cut = len(os.path.commonprefix([c0, c1]))
    cut = c0.rfind(" ", 0, cut) + 1  # the blank starts a word ("Sam" / "Sarah" share "Sa")
    return {"sentence": c0[:cut] + "_ " + r["continuation"], "option1": c0[cut:], "option2": c1[cut:],
            "answer": str(r["gold"] + 1)}


def _hellaswag_doc(i: int, r: dict) -> dict:
    # the mirror line is "activity_label: ctx" after llama.cpp's cleaning, which leaves a double space only
    # where three were: put the third back so the cleaning is undone
    label, ctx = r["ctx"].split(": ", 1)
    raw = lambda t: t.replace("  ", "   ")  # noqa: E731
    return {"ind": i, "activity_label": label, "ctx_a": raw(ctx), "ctx_b": "", "ctx": raw(ctx),
            "endings": [raw(e) for e in r["endings"]], "source_id": "", "split": "val", "split_type": "indomain",
            "label": str(r["label"])}


def _arc_doc(r: dict) -> dict:
    choices = r["question"]["choices"]
    return {"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}


def _targets(t: dict) -> dict:
    return {"choices": list(t), "labels": list(t.values())}


NLI = ["entailment", "not_entailment"]  # aps/super_glue's ClassLabel order for rte, axb, axg
HUB_DOCS = {  # dataset -> (mirror record, its index) -> Hub record
    "mmlu": lambda r, i: {"question": r["question"], "subject": r["source_file"].rsplit("_", 1)[0],
                          "choices": [r["A"], r["B"], r["C"], r["D"]], "answer": "ABCD".index(r["answer"].strip())},
    "race_middle": lambda r, i: {k: r[k] for k in ("example_id", "article", "question", "options", "answer")},
    "openbookqa": lambda r, i: {"id": str(i), "question_stem": r["query"], "answerKey": "ABCD"[r["gold"]],
                                "choices": {"text": r["choices"], "label": ["A", "B", "C", "D"]}},
    "boolq": lambda r, i: {"question": r["question"], "passage": r["passage"], "idx": r["idx"],
                           "label": ["false", "true"].index(r["label"])},
    "axb": lambda r, i: {"sentence1": r["sentence1"], "sentence2": r["sentence2"], "idx": int(r["idx"]),
                         "label": NLI.index(r["label"])},
    "axg": lambda r, i: {"premise": r["premise"], "hypothesis": r["hypothesis"], "idx": r["idx"],
                         "label": NLI.index(r["label"])},
    "rte": lambda r, i: {"premise": r["premise"], "hypothesis": r["hypothesis"], "idx": r["idx"],
                         "label": NLI.index(r["label"])},
    "copa": lambda r, i: {k: r[k] for k in ("premise", "choice1", "choice2", "question", "idx", "label")},
    "hellaswag": lambda r, i: _hellaswag_doc(i, r),
    "siqa": lambda r, i: {**{k: r[k] for k in ("context", "question", "answerA", "answerB", "answerC")},
                          "label": str(r["label"])},  # lighteval/siqa: "1".."3"
    "piqa": lambda r, i: {k: r[k] for k in ("goal", "sol1", "sol2", "label")},
    "arc_c": lambda r, i: _arc_doc(r),
    "arc_e": lambda r, i: _arc_doc(r),
    "truthfulqa": lambda r, i: {"question": r["question"], "mc1_targets": _targets(r["mc1_targets"]),
                                "mc2_targets": _targets(r["mc2_targets"])},
    "winogrande": lambda r, i: _winogrande_doc(r),
}
HUB_TASKS = sorted(n for n in TASK_FILES if n != "csl_dev")  # csl_fewclue has no Hub copy
FEWSHOT = {"mmlu": 2}  # MMLU's few-shot examples come from its dev split: read from the Hub too


def _splits(name: str) -> list[str]:
    spec = tasks.task_spec(name)
    return [spec["split"]] + ([spec["fewshot"]["split"]] if "fewshot" in spec else [])


def mirror_records(dataset: str, splits: list[str]) -> dict[str, list[dict]]:
    return {s: sources.load_raw(dataset, s).to_list() for s in splits}


def hub_docs(dataset: str, splits: list[str]) -> dict[str, list[dict]]:
    return {s: [HUB_DOCS[dataset](r, i) for i, r in enumerate(recs)]
            for s, recs in mirror_records(dataset, splits).items()}


def serve_hub(monkeypatch, docs: dict[str, list[dict]]) -> list[tuple]:
    """Read from the Hub from now on, with datasets.load_dataset answering from `docs` (split -> records)."""
    asked = []

    def load_dataset(path, name=None, *, split, **kwargs):
        asked.append((path, name, split))
        return datasets.Dataset.from_list(docs[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("CFSAM_DATA_SOURCE", "hub")
    return asked


@pytest.mark.parametrize("name", HUB_TASKS)
def test_hub_path_gives_the_mirror_items(name, monkeypatch):
    dataset, k = tasks.task_spec(name)["dataset"], FEWSHOT.get(name, 0)
    want, n_want = tasks.load_items(name, limit=300, num_fewshot=k)
    mirror = mirror_records(dataset, _splits(name))
    asked = serve_hub(monkeypatch, {s: [HUB_DOCS[dataset](r, i) for i, r in enumerate(recs)]
                                    for s, recs in mirror.items()})
    got, n_got = tasks.load_items(name, limit=300, num_fewshot=k)
    assert n_got == n_want and got == want
    for split, recs in mirror.items():  # every record, not only the sampled items: the mirror's fields and values
        from_hub = sources.load_eval(dataset, split)
        assert from_hub == [{key: m[key] for key in h} for m, h in zip(recs, from_hub)]
    spec = sources.dataset_spec(dataset)["hub"]
    assert {a[:2] for a in asked} == {(spec["id"], spec.get("config"))}
    assert {a[2] for a in asked} == set(_splits(name))
    assert tasks.data_hashes(name) == {f"hub:{hub.hub_ref(dataset, s)}": "unpinned" for s in _splits(name)}


def lm_eval_config(rel: str) -> dict:
    from lm_eval import tasks as lm_tasks

    return yaml.safe_load((Path(lm_tasks.__file__).parent / rel).read_text())


def lm_eval_item(cfg: dict, doc: dict) -> tuple[str, list[str], int]:
    """lm-eval's context, choices and gold for a Hub record (its ConfigurableTask rules for Jinja configs)."""
    from lm_eval.utils import apply_template

    text = doc[cfg["doc_to_text"]] if cfg["doc_to_text"] in doc else apply_template(cfg["doc_to_text"], doc)
    choice = cfg["doc_to_choice"]
    choices = choice if isinstance(choice, list) else (
        doc[choice] if choice in doc else ast.literal_eval(apply_template(choice, doc)))
    target = cfg["doc_to_target"]
    gold = target if isinstance(target, int) else (
        doc[target] if target in doc else int(apply_template(target, doc)))
    return cfg.get("description", "") + text, choices, gold


LM_EVAL_CONFIGS = {"arc_c": "arc/arc_easy.yaml", "arc_e": "arc/arc_easy.yaml", "openbookqa_fact": "openbookqa/openbookqa.yaml",
                   "boolq": "super_glue/boolq/default.yaml", "rte": "super_glue/rte/default.yaml",
                   "piqa": "piqa/piqa.yaml", "siqa": "siqa/siqa.yaml", "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml",
                   "mmlu": "mmlu/default/_default_template_yaml"}


@pytest.mark.parametrize("name", sorted(LM_EVAL_CONFIGS))
def test_hub_items_are_lm_evals_definitions_of_the_hub_records(name, monkeypatch):
    # lm-eval's task configs are written against these Hub ids: applied to the hand-made Hub records they must
    # give our items, which ties each hand conversion (label encodings above all) to lm-eval's reading of it
    spec = tasks.task_spec(name)
    docs = hub_docs(spec["dataset"], [spec["split"]])
    serve_hub(monkeypatch, docs)
    items, _ = tasks.load_items(name, limit=200)
    keep = [d for d in docs[spec["split"]] if name != "arc_c" or len(d["choices"]["text"]) == 4]  # arc_c's filter
    cfg = lm_eval_config(LM_EVAL_CONFIGS[name])
    for it in items:
        doc = keep[it.idx]
        if name == "mmlu":  # the per-subject config adds this description
            cfg["description"] = lm_eval_config(f"mmlu/default/mmlu_{doc['subject']}.yaml")["description"]
        context, choices, gold = lm_eval_item(cfg, doc)
        assert it.contexts == [context] * len(choices)
        assert it.continuations == [" " + c for c in choices]  # lm-eval's default target delimiter
        assert it.gold == gold


def test_hub_errors_name_the_task_the_hub_id_and_the_fix(monkeypatch):
    def offline(path, name=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("CFSAM_DATA_DIR", raising=False)  # no mirror: the Hub is the only source
    monkeypatch.delenv("CFSAM_DATA_SOURCE", raising=False)
    with pytest.raises(tasks.TaskMissing, match=r"task 'copa': .*aps/super_glue/copa:validation.*Hugging Face Hub"
                                                r".*OfflineModeIsEnabled.*set CFSAM_DATA_DIR.*allow Hub access"):
        tasks.load_items("copa")
    with pytest.raises(tasks.TaskMissing, match="task 'csl_dev': dataset 'csl_fewclue' has no Hugging Face Hub copy"
                                                ".*set CFSAM_DATA_DIR"):
        tasks.load_items("csl_dev")


def test_a_hub_record_that_does_not_fit_names_the_field(monkeypatch):
    serve_hub(monkeypatch, {"validation": [{"question": "q", "passage": "p", "idx": 0}]})  # no label
    # the Hub copy was read but does not fit: an error, not a missing task (issue #12)
    with pytest.raises(sources.DataError, match="task 'boolq': .*Hub record 0 of aps/super_glue/boolq:validation "
                                                "does not fit label: .*its fields: question, passage, idx$") as err:
        tasks.load_items("boolq")
    assert not isinstance(err.value, tasks.TaskMissing)


def test_race_high_comes_from_the_hub_only(monkeypatch):
    with pytest.raises(tasks.TaskMissing, match="RACE-high is not in the mirror.*CFSAM_DATA_SOURCE=hub.*ehovy/race/high"):
        tasks.load_items("race_high")
    doc = {"example_id": "high1.txt", "article": "A text.", "question": "Which?", "options": ["a", "b", "c", "d"],
           "answer": "C"}
    asked = serve_hub(monkeypatch, {"test": [doc]})
    items, n = tasks.load_items("race_high")
    assert asked == [("ehovy/race", "high", "test")] and n == 1
    assert items[0].contexts[0] == "Article: A text.\n\nWhich?" and items[0].gold == 2


@pytest.mark.mirror
def test_hellaswag_hub_record_is_cleaned_as_the_llamacpp_export(monkeypatch):
    # mirror item 3505 is a WikiHow item: its raw Hub text (built by hand from the mirror line and the
    # extractor's rules: "[header]" dropped, " [title]" -> ". ") must come out as the mirror's line
    mirror = sources.load_raw("hellaswag", "validation")[3505]
    assert mirror["ctx"].startswith("Family Life: How to entertain a toddler. Ask the toddler")
    raw = {**HUB_DOCS["hellaswag"](mirror, 3505),
           "ctx": "[header] How to entertain a toddler [title] Ask the toddler what he or she would like to do "
                  "instead of doing what you would like to do. [title] Visit a site like [www.kiddio.org] to find "
                  "loads of creative activities for toddlers and preschoolers. [title] Choose small, simple games "
                  "like candy land or chutes and ladders."}
    raw["endings"][1] = raw["endings"][1].replace("paper.. Watch", "paper. [title] Watch")
    serve_hub(monkeypatch, {"validation": [raw]})
    assert sources.load_eval("hellaswag", "validation") == [{k: mirror[k] for k in ("ctx", "label", "endings")}]
    from_raw, _ = tasks.load_items("hellaswag")
    serve_hub(monkeypatch, {"validation": [HUB_DOCS["hellaswag"](mirror, 3505)]})
    assert from_raw == tasks.load_items("hellaswag")[0]


def test_winogrande_hub_items_are_lm_evals_preprocessing(monkeypatch):
    from lm_eval.tasks.winogrande import preprocess_winogrande as wino

    docs = hub_docs("winogrande", ["validation"])
    serve_hub(monkeypatch, docs)
    items, _ = tasks.load_items("winogrande", limit=200)
    for it in items:
        doc = docs["validation"][it.idx]
        assert it.contexts == wino.doc_to_choice(doc)  # the options fill the blank
        assert it.continuations == [" " + wino.doc_to_target(doc)] * 2
        assert it.gold == wino.doc_to_text(doc)  # lm-eval's doc_to_text of winogrande is the gold index
