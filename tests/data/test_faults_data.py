"""Issue #12, data and evaluation layers: a damaged file is an error naming it, never a 'missing' task, and
unreadable paths, an offline Hub and a malformed tokenizer.json end in one clear error, not a traceback.

Each test builds its own mirror under tmp_path from copies of the configured one (the shared mirror or the
fixtures, which stay read-only)."""
import os
import shutil
from pathlib import Path

import datasets
import pytest

from cfsam.data import formatting, models, sources
from cfsam.evaluation import harness, tasks

COPA = "superglue/COPA/val.jsonl"


def make_mirror(root: Path, *rels: str, manifest: bool = True) -> Path:
    """A mirror at root holding copies of the configured mirror's files rels (and its MANIFEST.md)."""
    shared = Path(os.environ["CFSAM_DATA_DIR"])
    for rel in rels + (("MANIFEST.md",) if manifest else ()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / rel, root / rel)
    return root


def truncate(path: Path, *, lines: int | None = None, nbytes: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(b"".join(data.splitlines(keepends=True)[:lines]) if lines else data[:nbytes])


@pytest.mark.parametrize("cut", ["mid-line", "whole-lines"])
def test_a_truncated_eval_file_is_an_error_naming_it_not_a_missing_task(cut, tmp_path, monkeypatch, manifest):
    root = make_mirror(tmp_path, COPA)
    size, n = (root / COPA).stat().st_size, manifest.records(COPA)
    truncate(root / COPA, **({"nbytes": size // 2} if cut == "mid-line" else {"lines": n // 2}))  # whole lines parse
    monkeypatch.setenv("CFSAM_DATA_DIR", str(root))
    with pytest.raises(sources.DamagedFile, match=rf"task 'copa': dataset 'copa': {root / COPA} is \d+ bytes but "
                                                  f"MANIFEST.md lists {manifest.bytes(COPA)}.*restore it"):
        tasks.load_items("copa")
    assert sources.availability("copa").startswith(f"damaged: dataset 'copa': {root / COPA}")


def test_a_malformed_file_is_named_without_a_manifest_too(tmp_path, monkeypatch):
    root = make_mirror(tmp_path, COPA, manifest=False)  # no MANIFEST.md: sizes cannot be checked, parsing can
    truncate(root / COPA, nbytes=(root / COPA).stat().st_size // 2)
    monkeypatch.setenv("CFSAM_DATA_DIR", str(root))
    with pytest.raises(sources.DamagedFile, match=rf"task 'copa': dataset 'copa': malformed file {root / COPA} "
                                                  r"\(ArrowInvalid: JSON parse error"):
        tasks.load_items("copa")


def test_the_bad_file_of_a_many_file_split_is_named(tmp_path, monkeypatch):
    shared = Path(os.environ["CFSAM_DATA_DIR"])
    rels = sorted(str(p.relative_to(shared)) for p in (shared / "mmlu/data/dev").glob("*.csv"))
    root = make_mirror(tmp_path, *rels, manifest=False)
    with open(root / rels[7], "a") as f:
        f.write('x,"an unterminated quote\n')
    monkeypatch.setenv("CFSAM_DATA_DIR", str(root))
    with pytest.raises(sources.DamagedFile, match=rf"malformed file {root / rels[7]} \(ParserError"):
        sources.load_raw("mmlu", "dev")


def test_only_a_set_the_mirror_lacks_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_DATA_DIR", str(make_mirror(tmp_path)))  # MANIFEST.md only
    with pytest.raises(tasks.TaskMissing, match="RACE-high is not in the mirror"):  # the registry says so
        tasks.load_items("race_high")
    with pytest.raises(sources.DataError, match=f"no file matches {tmp_path / COPA}, which the data registry "
                                                "expects in the mirror") as err:
        tasks.load_items("copa")  # the registry lists it, the mirror should hold it: not a missing set
    assert not isinstance(err.value, tasks.TaskMissing)


def test_evaluate_raises_on_a_damaged_task_file_instead_of_scoring_without_it(tiny, tmp_path, monkeypatch):
    # the case: COPA truncated, the Reasoning score was BoolQ's alone and the entry looked fine
    root = make_mirror(tmp_path / "mirror", "superglue/BoolQ/val.jsonl", COPA)
    truncate(root / COPA, nbytes=(root / COPA).stat().st_size // 2)
    monkeypatch.setenv("CFSAM_DATA_DIR", str(root))
    with pytest.raises(sources.DamagedFile, match=f"task 'copa': .*{root / COPA}"):
        harness.evaluate(tiny, ["boolq", "copa", "race_high"], limit=2, cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*.json"))  # nothing scored, nothing cached
    res = harness.evaluate(tiny, ["race_high"], limit=2, cache_dir=tmp_path / "cache", progress=False)
    assert res["tasks"]["race_high"]["status"] == "missing"  # a set the mirror lacks still is


def test_a_directory_in_a_files_place_is_named(tmp_path, monkeypatch):
    root = make_mirror(tmp_path, "piqa/dev.jsonl")
    (root / COPA).mkdir(parents=True)
    (root / "piqa/dev-labels.lst").mkdir(parents=True)
    (root / "alpaca/alpaca_5000.json").mkdir(parents=True)
    monkeypatch.setenv("CFSAM_DATA_DIR", str(root))
    with pytest.raises(sources.DamagedFile, match=f"task 'copa': dataset 'copa': {root / COPA} is a directory, "
                                                  "not a data file; restore it"):
        tasks.load_items("copa")
    with pytest.raises(sources.DamagedFile, match=f"{root / 'piqa/dev-labels.lst'} is a directory"):
        tasks.load_items("piqa")
    with pytest.raises(sources.DamagedFile, match=f"{root / 'piqa/dev-labels.lst'} is a directory"):
        tasks.data_hashes("piqa")
    with pytest.raises(sources.DamagedFile, match=f"dataset 'alpaca': {root / 'alpaca/alpaca_5000.json'} is a "
                                                  "directory"):
        formatting.load_records("alpaca")
    monkeypatch.setenv("CFSAM_DATA_DIR", str(root / "MANIFEST.md"))  # the mirror itself: a file
    with pytest.raises(sources.DataError, match="CFSAM_DATA_DIR=.*MANIFEST.md is not a directory; point it at"):
        formatting.load_records("gsm8k")


def test_a_label_file_that_does_not_match_its_records_is_named(tmp_path, monkeypatch, manifest):
    root = make_mirror(tmp_path, "piqa/dev.jsonl", "piqa/dev-labels.lst", manifest=False)
    n = manifest.records("piqa/dev.jsonl")  # the mirror: 1838
    truncate(root / "piqa/dev-labels.lst", lines=n // 2)
    monkeypatch.setenv("CFSAM_DATA_DIR", str(root))
    with pytest.raises(sources.DamagedFile, match=f"{root / 'piqa/dev-labels.lst'} holds {n // 2} labels for {n}"):
        tasks.load_items("piqa")


def test_a_record_that_does_not_fit_the_task_names_the_file(tmp_path, monkeypatch):
    root = make_mirror(tmp_path, COPA, manifest=False)
    lines = (root / COPA).read_text().splitlines()
    (root / COPA).write_text("\n".join(lines[:3] + ['{"premise": "A premise.", "idx": 3}'] + lines[4:]) + "\n")
    monkeypatch.setenv("CFSAM_DATA_DIR", str(root))
    with pytest.raises(sources.DamagedFile, match=f"task 'copa': item 3 of {root / COPA} does not fit the task"):
        tasks.load_items("copa")


def test_training_without_a_mirror_with_the_hub_offline_is_one_clear_error(monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(path, *args, **kwargs):  # what HF_HUB_OFFLINE=1 gives, without depending on this machine's cache
        raise OfflineModeIsEnabled(f"Cannot reach https://huggingface.co/api/datasets/{path}: offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("CFSAM_DATA_DIR", raising=False)
    monkeypatch.delenv("CFSAM_DATA_SOURCE", raising=False)
    with pytest.raises(sources.DataUnavailable, match=r"dataset 'alpaca': cannot read tatsu-lab/alpaca:train from the "
                                                      r"Hugging Face Hub \(OfflineModeIsEnabled: .*\); set "
                                                      "CFSAM_DATA_DIR to a local data mirror.*or allow Hub access"):
        formatting.build_dataset("alpaca", None, n=4)
    assert issubclass(sources.DataUnavailable, ValueError)  # the CLI prints it as one line


@pytest.fixture
def tiny_dir(tiny, tmp_path) -> Path:
    """The tiny model saved as a model directory (as a trained stage is)."""
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize("damage", ["truncated", "empty object", "wrong model type"])
def test_a_malformed_tokenizer_json_is_named(damage, tiny_dir):
    import json

    path = tiny_dir / "tokenizer.json"
    text = path.read_text()
    bad = json.loads(text)
    bad["model"]["type"] = "NoSuchModel"
    path.write_text({"truncated": text[:1000], "empty object": "{}", "wrong model type": json.dumps(bad)}[damage])
    with pytest.raises(models.DamagedModelFile, match=f"the tokenizer in {tiny_dir} cannot be loaded: {path} is "
                                                      r"damaged \(.*\); restore tokenizer.json"):
        models.load_tokenizer(str(tiny_dir))
    assert issubclass(models.DamagedModelFile, models.ModelUnavailable)  # a RuntimeError: one line in the CLI


def test_a_truncated_model_file_is_named(tiny_dir):
    truncate(tiny_dir / "model.safetensors", nbytes=4096)
    with pytest.raises(models.DamagedModelFile, match=f"the model in {tiny_dir} cannot be loaded: "
                                                      f"{tiny_dir / 'model.safetensors'} is damaged"):
        models.load_model(str(tiny_dir))


def test_a_damaged_converted_preset_says_how_to_convert_it_again(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CFSAM_CACHE", str(tmp_path / "cache"))
    out = models.converted_dir("smollm2-135m")
    shutil.copytree(tiny_dir, out)
    (out / "tokenizer.json").write_text("{")
    with pytest.raises(models.DamagedModelFile, match=f"{out / 'tokenizer.json'} is damaged.*delete {out} and run "
                                                      "`cfsam prepare-model smollm2-135m`"):
        models.load_tokenizer("smollm2-135m")


def test_no_network_is_one_quick_clear_error_naming_both_ways(monkeypatch):
    """With no network and the Hub not switched offline, datasets retried each set for half a minute."""
    import socket

    from cfsam.data import hub

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the Hub with no network"))
    for var in ("HF_HUB_OFFLINE", "CFSAM_DATA_DIR", "CFSAM_DATA_SOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    hub._no_network.cache_clear()
    try:
        with pytest.raises(sources.DataUnavailable, match=r"dataset 'alpaca': cannot read tatsu-lab/alpaca:train .*"
                                                          r"no network: huggingface.co cannot be reached .*Name or "
                                                          r"service.*set CFSAM_DATA_DIR.*or allow Hub access"):
            hub.load_hub("alpaca", "train")
    finally:
        hub._no_network.cache_clear()
