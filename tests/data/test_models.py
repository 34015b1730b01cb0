import pytest
import torch

from cfsam.data import models


def test_tiny_is_a_small_llama_with_the_smollm2_tokenizer(tiny):
    n = sum(p.numel() for p in tiny.model.parameters())
    emb = tiny.model.get_input_embeddings().weight.numel()
    assert 0.1e6 < n - emb < 2e6  # ~1M parameters plus embeddings
    assert tiny.model.config.vocab_size == len(tiny.tokenizer) == 49152


def test_weights_hash_sees_a_single_changed_value(tiny):
    before = models.weights_hash(tiny.model)
    p = next(tiny.model.parameters())
    with torch.no_grad():
        old = p.view(-1)[0].item()
        p.view(-1)[0] += 1e-3
        changed = models.weights_hash(tiny.model)
        p.view(-1)[0] = old
    assert changed != before and models.weights_hash(tiny.model) == before


def test_unknown_and_unreachable_models_fail_clearly(monkeypatch):
    with pytest.raises(ValueError, match="unknown model preset 'gpt2'.*allowed: smollm2-135m, tiny"):
        models.load_model("gpt2")
    with pytest.raises(models.ModelUnavailable, match="Hugging Face Hub id 'meta-llama/Llama-2-7b-hf'"):
        models.load_model("llama2-7b")


@pytest.mark.slow
def test_smollm2_answers_a_factual_question_greedily():
    loaded = models.load_model("smollm2-135m")
    assert sum(p.numel() for p in loaded.model.parameters()) == 134515008  # the GGUF's parameter count
    tok = loaded.tokenizer
    batch = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_converted_model_equals_the_gguf_dequantization():
    """The cached safetensors weights are exactly transformers' own GGUF dequantization."""
    from transformers import AutoModelForCausalLM

    spec = models.model_spec("smollm2-135m")
    gguf = models._gguf_path(spec)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ours = models.load_model("smollm2-135m").model
    ref_sd = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


def test_converted_model_saves_like_any_model(tmp_path):
    """A model loaded from the conversion is a plain model: training it ends in save_pretrained."""
    from transformers import AutoModelForCausalLM

    loaded = models.load_model("smollm2-135m")
    assert getattr(loaded.model.config, "quantization_config", None) is None
    loaded.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert models.weights_hash(again) == models.weights_hash(loaded.model)
