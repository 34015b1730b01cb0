"""The dataset registry against MANIFEST.md, the Alpaca template and the response-only label mask."""

import datasets
import pytest

from cfsam.data import catalog, sources
from cfsam.data import formatting

def manifest_counts() -> dict[str, int]:
    """local file -> record count, from the mirror's MANIFEST.md table (independent of our registry)."""
    text = (sources.data_dir() / "MANIFEST.md").read_text()
    out = {}
    for row in text.splitlines():
        cells = [c.strip() for c in row.split("|")]
        if len(cells) > 7 and cells[2].startswith("`") and cells[6].isdigit():
            out[cells[2].strip("`")] = int(cells[6])
    return out


def test_every_mirror_file_of_the_registry_loads_with_the_manifest_count():
    counts = manifest_counts()
    assert len(counts) > 40
    checked = 0
    for name in sources.dataset_names():
        spec = sources.dataset_spec(name)
        for split in spec.get("files", {}):
            files = sources.raw_files(name, split)
            rel = [str(f.relative_to(sources.data_dir())) for f in files]
            if len(rel) == 1 and rel[0] in counts:
                assert len(sources.load_raw(name, split)) == counts[rel[0]], (name, split)
                checked += 1
    assert checked >= 25


def math_train_count(manifest) -> int:
    return sum(manifest.records(rel) for rel in manifest.rows if rel.startswith("math/") and rel.endswith("_train.json"))


def test_mmlu_and_math_totals_match_the_manifest(manifest):
    mmlu = "mmlu/data/{dev,val,test}/*.csv"  # one row: dev 285 / val 1531 / test 14042 in the mirror
    assert len(sources.load_raw("mmlu", "test")) == manifest.split_records(mmlu, "test")
    assert len(sources.load_raw("mmlu", "dev")) == manifest.split_records(mmlu, "dev")
    assert len(sources.load_raw("math", "train")) == math_train_count(manifest)  # the mirror: 7500


@pytest.mark.mirror
def test_the_mirror_holds_the_full_mmlu_and_math():
    assert len(sources.load_raw("mmlu", "test")) == 14042  # MANIFEST: dev 285 / val 1531 / test 14042
    assert len(sources.load_raw("math", "train")) == 7500  # MANIFEST notes: MATH train 7500


def test_substitutes_and_variants_are_labelled(manifest):
    assert "GSM8K" in sources.label("metamathqa") and "MATH" in sources.label("metamathqa")
    assert len(formatting.load_records("metamathqa", "all")) == manifest.records("gsm8k/train.jsonl") + \
        math_train_count(manifest)  # the mirror: 7473 + 7500
    assert "MATH" in sources.label("open-platypus")
    assert "5,000" in sources.label("alpaca")
    assert sources.label("gsm8k") is None
    with pytest.raises(sources.DataError, match="RACE-high is not in the mirror"):
        sources.raw_files("race_high")


def test_shared_sources_are_the_stand_ins_common_records():
    # independent of the registry's substitute lists: compare the records themselves
    def texts(name):
        return {t["prompt"] + t["response"] for r in formatting.load_records(name, "all") for t in r["turns"]}
    assert texts("open-platypus") <= texts("metamathqa")
    assert texts("alpaca").isdisjoint(texts("metamathqa"))
    names = ["alpaca", "metamathqa", "open-platypus", "sharegpt", "auto-wiki"]
    assert sources.shared_sources(names) == [("metamathqa", "open-platypus", ["math"])]


def test_heldout_split_is_disjoint_fixed_and_five_percent():
    train, held = formatting.load_records("alpaca", "train"), formatting.load_records("alpaca", "heldout")
    assert set(train["id"]).isdisjoint(held["id"])
    assert len(held) == int(0.05 * (len(train) + len(held)))
    assert held["id"] == formatting.load_records("alpaca", "heldout")["id"]


def test_alpaca_template_and_response_only_mask(tokenizer):
    turns = [{"prompt": formatting.PROMPT_NO_INPUT.format(instruction="Say hi."), "response": "Hi there"}]
    out = formatting.tokenize(turns, tokenizer, max_length=512)
    n_prompt = len(tokenizer(turns[0]["prompt"], add_special_tokens=False)["input_ids"])
    n_resp = len(tokenizer("Hi there", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert len(out["input_ids"]) == n_prompt + n_resp
    assert out["labels"].count(-100) == n_prompt
    assert out["labels"][n_prompt:] == out["input_ids"][n_prompt:]
    assert out["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(out["input_ids"][:n_prompt]).endswith("### Response:\n")


def test_multi_turn_masks_every_prompt_and_truncates(tokenizer):
    turns = [{"prompt": "Q1", "response": "A1"}, {"prompt": "Q2", "response": "A2"}]
    out = formatting.tokenize(turns, tokenizer, max_length=512)
    pieces = formatting.segments(turns)
    assert [p[1] for p in pieces] == [False, True, False, True]
    masked = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t, r in pieces if not r)
    assert out["labels"].count(-100) == masked
    short = formatting.tokenize(turns, tokenizer, max_length=5)
    assert len(short["input_ids"]) == 5 and len(short["labels"]) == 5


def test_alpaca_record_with_input_uses_the_input_template():
    rec = formatting.load_records("alpaca", "all")
    with_input = next(r for r in rec.select(range(50)) if "### Input:" in r["turns"][0]["prompt"])
    assert with_input["turns"][0]["prompt"].startswith("Below is an instruction that describes a task, paired")


def test_build_dataset_is_seeded_and_keeps_response_tokens(tokenizer):
    a = formatting.build_dataset("gsm8k", tokenizer, n=6, seed=1, max_length=96)
    b = formatting.build_dataset("gsm8k", tokenizer, n=6, seed=1, max_length=96)
    c = formatting.build_dataset("gsm8k", tokenizer, n=6, seed=2, max_length=96)
    assert a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]
    assert all(len(x) <= 96 and any(t != -100 for t in y) for x, y in zip(a["input_ids"], a["labels"]))


def test_collate_pads_with_ignored_labels():
    batch = formatting.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                         pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_rehearsal_mix_has_the_asked_fraction():
    s2 = datasets.Dataset.from_dict({"input_ids": [[2]] * 90, "labels": [[2]] * 90})
    s1 = datasets.Dataset.from_dict({"input_ids": [[1]] * 50, "labels": [[1]] * 50})
    mixed = formatting.mix_rehearsal(s2, s1, fraction=0.1, seed=0)
    assert len(mixed) == 100 and sum(x == [1] for x in mixed["input_ids"]) == 10
    with pytest.raises(sources.DataError, match="fraction"):
        formatting.mix_rehearsal(s2, s1, fraction=1.0)


def test_bad_names_and_malformed_files(tmp_path, monkeypatch):
    with pytest.raises(sources.DataError, match="unknown dataset 'alpacca'.*allowed: alpaca"):
        sources.dataset_spec("alpacca")
    with pytest.raises(sources.DataError, match="evaluation set"):
        formatting.load_records("copa")
    with pytest.raises(sources.DataError, match="split 'dev'"):
        formatting.load_records("alpaca", "dev")
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_5000.json").write_text('[{"instruction": "x", "output": ')
    monkeypatch.setenv("CFSAM_DATA_DIR", str(tmp_path))
    with pytest.raises(sources.DataError, match="malformed"):
        formatting.load_records("alpaca")
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(__import__("bz2").compress(b"a\n1\nb\n"))
    with pytest.raises(sources.DataError, match="multiple of 6"):
        sources.load_raw("hellaswag", "validation")


def test_llamacpp_clean_follows_the_extractor_rules_by_hand():
    # extract_hellaswag.cpp: "[header]", "[step]", "[substeps]" dropped, " [title]" -> ". ", then ONE pass of
    # "  " -> " " (three spaces leave two), then one leading and one trailing space dropped
    raw = "[header] How to paint a wall [title] Buy paint. [step] Pick a colour  [substeps] it dries. "
    assert catalog.llamacpp_clean(raw) == "How to paint a wall. Buy paint. Pick a colour  it dries."
    assert catalog.llamacpp_clean("Roof shingle removal") == "Roof shingle removal"


def test_hub_sources_are_named_by_id_config_split_and_revision(monkeypatch):
    monkeypatch.setenv("CFSAM_DATA_SOURCE", "hub")
    assert sources.file_hashes("mmlu", ["test", "dev"]) == {"hub:cais/mmlu/all:test": "unpinned",
                                                        "hub:cais/mmlu/all:dev": "unpinned"}
    assert sources.file_hashes("alpaca") == {"hub:tatsu-lab/alpaca": "unpinned"}
    assert sources.file_hashes("csl_fewclue") == {"missing": sources.dataset_spec("csl_fewclue")["hub"]["missing"]}
    assert sources.availability("race_high") == "hub (ehovy/race/high)"
    assert "fact" in sources.label("openbookqa") and sources.label("copa") is None
    monkeypatch.setitem(sources.dataset_spec("copa")["hub"], "revision", "0123abc")  # a pinned commit: read, recorded
    assert sources.file_hashes("copa", ["validation"]) == {"hub:aps/super_glue/copa:validation": "0123abc"}
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: asked.append((a, kw)) or datasets.Dataset.from_list(
        [{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "idx": 0, "label": 1}]))
    assert sources.load_eval("copa", "validation")[0]["label"] == 1
    assert asked == [(("aps/super_glue", "copa"), {"split": "validation", "revision": "0123abc"})]
