"""Feed the data mirror's files to lm-evaluation-harness's own task definitions.

Each ``load_*`` is a ``custom_dataset`` for one config in this folder: it reads the mirror file
(``$CFSAM_DATA_DIR``) with ``datasets`` and reshapes the records into the schema of the Hugging Face copy
that lm-eval's stock task expects; prompts, choices and targets then come from lm-eval's stock configs
and utils (imported below), not from cfsam. Doc order = file order, so doc ids match cfsam's item ids.
"""
import glob
import os

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401 (used in yaml)
from lm_eval.tasks.race.preprocess_race import doc_to_choice as race_doc_to_choice  # noqa: F401
from lm_eval.tasks.race.preprocess_race import doc_to_target as race_doc_to_target  # noqa: F401
from lm_eval.tasks.race.preprocess_race import doc_to_text as race_doc_to_text  # noqa: F401
from lm_eval.tasks.super_glue.copa.utils import doc_to_choice as copa_doc_to_choice  # noqa: F401
from lm_eval.tasks.super_glue.copa.utils import doc_to_target as copa_doc_to_target  # noqa: F401
from lm_eval.tasks.super_glue.copa.utils import doc_to_text as copa_doc_to_text  # noqa: F401
from lm_eval.tasks.truthfulqa.utils import process_results_mc2  # noqa: F401


def _path(rel):
    root = os.environ.get("CFSAM_DATA_DIR")
    if not root:
        raise RuntimeError("set CFSAM_DATA_DIR to the data mirror")
    return os.path.join(root, rel)


def _rows(rel, fmt="json", **kwargs):
    return datasets.load_dataset(fmt, data_files=_path(rel), split="train", **kwargs).to_list()


def _split(name, rows):
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows)})


def load_copa(**kwargs):
    return _split("validation", _rows("superglue/COPA/val.jsonl"))


def load_boolq(**kwargs):
    return _split("validation", [dict(r, label=["false", "true"].index(str(r["label"]).lower()))
                                 for r in _rows("superglue/BoolQ/val.jsonl")])


def load_rte(**kwargs):
    labels = {"entailment": 0, "not_entailment": 1}
    return _split("validation", [dict(r, label=labels[r["label"]]) for r in _rows("superglue/RTE/val.jsonl")])


def _arc(rel, only4):
    rows = []
    for r in _rows(rel):
        choices = r["question"]["choices"]
        if only4 and len(choices) != 4:
            continue
        rows.append({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
    return rows


def load_arc_c(**kwargs):
    # the paper's (OpenCompass's) ARC-c: ARC-Challenge-Dev without its items that lack exactly 4 choices
    return _split("validation", _arc("arc/ARC-Challenge-Dev.jsonl", only4=True))


def load_arc_e(**kwargs):
    return _split("test", _arc("arc/ARC-Easy-Test.jsonl", only4=False))


def load_hellaswag(**kwargs):
    # llama.cpp's 6-line export: "activity_label: ctx_a ctx_b", gold, 4 endings; ctx_b is the lower-case
    # fragment after ctx_a's last full stop (if any), which lm-eval's process_docs capitalises.
    lines = [r["text"] for r in _rows("hellaswag/hellaswag_val_full.txt.bz2", "text")]
    rows = []
    for i in range(0, len(lines), 6):
        label, ctx = lines[i].split(": ", 1)
        head, sep, tail = ctx.rpartition(". ")
        ctx_a, ctx_b = (head + ".", tail) if sep and tail[:1].islower() else (ctx, "")
        rows.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "label": lines[i + 1],
                     "endings": lines[i + 2:i + 6]})
    return _split("validation", rows)


def _with_labels(rel, labels_rel, offset):
    rows = _rows(rel)
    labels = open(_path(labels_rel)).read().split()
    assert len(labels) == len(rows), (rel, len(labels), len(rows))
    return [dict(r, label=str(int(x) + offset)) for r, x in zip(rows, labels)]


def load_siqa(**kwargs):
    return _split("validation", _with_labels("siqa/dev.jsonl", "siqa/dev-labels.lst", 0))


def load_piqa(**kwargs):
    return _split("validation", [dict(r, label=int(r["label"]))
                                 for r in _with_labels("piqa/dev.jsonl", "piqa/dev-labels.lst", 0)])


def load_openbookqa(**kwargs):
    # MosaicML's OBQA main test: query = question_stem, choices, gold index
    return _split("test", [{"question_stem": r["query"], "answerKey": "ABCD"[r["gold"]],
                            "choices": {"text": r["choices"], "label": list("ABCD")}}
                           for r in _rows("openbookqa/openbook_qa.jsonl")])


def load_race_middle(**kwargs):
    # one doc per question, in the shape of EleutherAI/race (article + a list of problems, the last asked)
    return _split("test", [{"article": r["article"],
                            "problems": repr([{k: r[k] for k in ("question", "answer", "options")}])}
                           for r in _rows("race/test/middle.jsonl")])


def load_winogrande(**kwargs):
    # MosaicML's schema format holds lm-eval's two partial contexts and the shared continuation
    return _split("validation", _rows("winogrande/winogrande.jsonl"))


def winogrande_doc_to_text(doc):
    return doc["gold"]


def winogrande_doc_to_choice(doc):
    return doc["context_options"]


def winogrande_doc_to_target(doc):
    return doc["continuation"]


def load_truthfulqa(**kwargs):
    rows = []
    for r in _rows("truthfulqa/mc_task.json"):
        targets = {k: {"choices": list(r[k]), "labels": list(r[k].values())} for k in ("mc1_targets", "mc2_targets")}
        rows.append({"question": r["question"], **targets})
    return _split("validation", rows)


def load_mmlu(**kwargs):
    # the 57 test CSVs (no header), in sorted file order, with the subject taken from the file name
    rows = []
    for f in sorted(glob.glob(_path("mmlu/data/test/*_test.csv"))):
        subject = os.path.basename(f)[: -len("_test.csv")]
        ds = datasets.load_dataset("csv", data_files=f, split="train", header=None, keep_default_na=False,
                                   names=["question", "A", "B", "C", "D", "answer"],
                                   features=datasets.Features({c: datasets.Value("string")
                                                               for c in ["question", "A", "B", "C", "D", "answer"]}))
        rows += [{"question": r["question"], "subject": subject, "choices": [r["A"], r["B"], r["C"], r["D"]],
                  "answer": "ABCD".index(r["answer"].strip())} for r in ds]
    return _split("test", rows)
