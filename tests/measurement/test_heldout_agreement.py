"""Held-out losses do not depend on how the examples are batched (issue 26).

The reference for every example is a plain transformers forward on that example alone, with no padding:
``-log_softmax(logits)`` at the labelled next tokens, summed. Against it: ``per_example_losses`` (the
measure path) and ``summed_loss`` (the training path, with gradients and chunk checkpointing) over several
batch compositions, with right and left padding, in fp32 and under bf16 autocast. And the cause of the
H200 disagreement: a converted tokenizer whose EOS is not the model's."""
import json
import random
import shutil

import pytest
import torch

from cfsam.core.errors import UsageError
from cfsam.data import formatting, models
from cfsam.measurement import heldout
from cfsam.training.loss import summed_loss

FP32_TOL = 1e-4  # per example, on the token-mean loss (the tolerance)
# bf16 autocast rounds every matmul input to 8 mantissa bits: batched and one-at-a-time forwards round
# differently (up to 9e-4 here on a loss near 10.8, and 0.002 on SmolLM2's real held-out mean); the H200's
# wrong EOS moved a per-example mean by 0.05 to 1.5.
BF16_TOL = 1e-2


@pytest.fixture(scope="module")
def rows(tokenizer):
    """Six tokenised examples (prompt labels -100, each response ending with EOS) of unequal lengths."""
    texts = [("Name a colour.", "Blue."),
             ("Add 17 and 25, then explain each step of the sum in words.", "17 + 25 = 42: seven and five make twelve."),
             ("Translate 'cat' into French.", "Chat."),
             ("Write one sentence about the sea.", "The sea is wide, grey and restless today, under a low sky."),
             ("What is 2 + 2?", "4"),
             ("List three prime numbers greater than ten and say why each is prime.", "11, 13 and 17: no divisor "
              "other than one and itself.")]
    out = [formatting.tokenize([{"prompt": formatting.PROMPT_NO_INPUT.format(instruction=p), "response": r}],
                               tokenizer, max_length=96) for p, r in texts]
    assert len({len(r["input_ids"]) for r in out}) == len(out)  # every batch of two or more pads something
    return out


def reference(model, row) -> tuple[float, int]:
    """(summed response-token loss, tokens) of one example alone: no padding, no attention mask."""
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    nxt, keep = labels[1:], labels[1:] != -100
    return float(-logp[:-1][keep].gather(1, nxt[keep, None]).sum()), int(keep.sum())


def pad(rows, pad_id: int, side: str) -> dict[str, torch.Tensor]:
    if side == "right":
        return formatting.collate(rows, pad_id)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n:], labels[i, width - n:], mask[i, width - n:] = (torch.tensor(r["input_ids"]),
                                                                          torch.tensor(r["labels"]), 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def compositions(n: int):
    """Orders and batch sizes: one at a time, pairs, threes, all at once, and a shuffled order in fours."""
    order = list(range(n))
    shuffled = order[:]
    random.Random(0).shuffle(shuffled)
    return [(order, 1), (order, 2), (order[::-1], 3), (order, n), (shuffled, 4)]


def batched(rows, order, size, pad_id, side):
    return [pad([rows[i] for i in order[s:s + size]], pad_id, side) for s in range(0, len(order), size)]


def assert_means_close(got, want, tol):
    assert [n for _, n in got] == [n for _, n in want]
    gap = max(abs(s / n - t / n) for (s, n), (t, _) in zip(got, want))
    assert gap <= tol, f"per-example mean losses differ by up to {gap:.3g} (tolerance {tol})"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_per_example_losses_do_not_depend_on_the_batch(tiny, tokenizer, rows, side, precision):
    model = tiny.model.eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        want = [reference(model, r) for r in rows]
    fp32 = [reference(model, r) for r in rows]
    for order, size in compositions(len(rows)):
        with autocast:
            got = heldout.per_example_losses(model, batched(rows, order, size, tokenizer.pad_token_id, side))
        back = [None] * len(rows)
        for i, value in zip(order, got):
            back[i] = value
        assert_means_close(back, want, FP32_TOL if precision == "fp32" else BF16_TOL)
        assert_means_close(back, fp32, FP32_TOL if precision == "fp32" else BF16_TOL)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_training_loss_is_the_sum_of_the_examples_alone(tiny, tokenizer, rows, side, precision):
    """``summed_loss`` as a training step calls it (train mode, gradients on, chunks checkpointed, bf16
    autocast when the stage says so): each batch's sum is the sum of its examples taken alone."""
    model = tiny.model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        alone = [reference(model, r) for r in rows]
    tol = FP32_TOL if precision == "fp32" else BF16_TOL
    model.train()
    try:
        for order, size in compositions(len(rows)):
            for s in range(0, len(order), size):
                part = order[s:s + size]
                b = pad([rows[i] for i in part], tokenizer.pad_token_id, side)
                with autocast:
                    total, n = summed_loss(model, b["input_ids"], b["attention_mask"], b["labels"], chunk=7)
                assert total.requires_grad  # the training path, not an inference shortcut
                want_n = sum(alone[i][1] for i in part)
                assert int(n) == want_n
                assert float(total.detach()) / want_n == pytest.approx(sum(alone[i][0] for i in part) / want_n, abs=tol)
    finally:
        model.eval()


def test_measured_heldout_batches_agree_with_one_at_a_time(tiny, tokenizer):
    """The batches the runner measures (a real held-out split, 8 a batch, right padding) against the
    reference, example by example."""
    batches = heldout.heldout_batches("alpaca", tokenizer, n_examples=6, batch_size=4, max_length=64)
    got = heldout.per_example_losses(tiny.model.eval(), batches)
    rows = [{"input_ids": b["input_ids"][i][b["attention_mask"][i].bool()].tolist(),
             "labels": b["labels"][i][b["attention_mask"][i].bool()].tolist()}
            for b in batches for i in range(b["input_ids"].shape[0])]
    assert_means_close(got, [reference(tiny.model, r) for r in rows], FP32_TOL)


def test_per_example_losses_batch_by_length_and_keep_the_given_order(tiny, tokenizer, rows):
    """Given in an order that pads a lot, the forwards run the examples longest first in batches of the given
    size, so they see the widths of the sorted lengths (counted by hand), and the result is in the given order."""
    model = tiny.model.eval()
    order = [0, 5, 4, 1, 2, 3]  # short next to long in every pair
    given = batched(rows, order, 2, tokenizer.pad_token_id, "left")
    widths = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        got = heldout.per_example_losses(model, given)
    finally:
        hook.remove()
    lengths = sorted((len(r["input_ids"]) for r in rows), reverse=True)
    assert widths == [(2, lengths[0]), (2, lengths[2]), (2, lengths[4])]
    assert sum(w * n for n, w in widths) < sum(b["input_ids"].numel() for b in given)
    assert_means_close(got, [reference(model, rows[i]) for i in order], FP32_TOL)


def test_by_length_keeps_every_example_and_the_landscapes_sums(tiny, tokenizer, rows):
    """The landscape's layout (``by_length``, as ``runner.landscape_batches`` gives it): the same examples, each
    batch as wide as its longest, and the same token-mean loss, gradient and Hessian-vector product as the
    given batches, up to fp32 summation order."""
    from cfsam.measurement import curvature

    model = tiny.model.eval()
    given = batched(rows, [0, 5, 4, 1, 2, 3], 3, tokenizer.pad_token_id, "left")
    order, sorted_batches = heldout.by_length(given, 2)
    assert sorted(order) == list(range(len(rows)))
    given_order = [rows[i] for i in [0, 5, 4, 1, 2, 3]]
    lengths = [len(given_order[i]["input_ids"]) for i in order]
    assert lengths == sorted(lengths, reverse=True)
    assert [tuple(b["input_ids"].shape) for b in sorted_batches] == [(2, lengths[0]), (2, lengths[2]), (2, lengths[4])]
    assert heldout.count_items(sorted_batches) == heldout.count_items(given)
    assert heldout.mean_loss(model, sorted_batches) == pytest.approx(heldout.mean_loss(model, given), rel=1e-6)
    (la, ga), (lb, gb) = curvature.gradient(model, given), curvature.gradient(model, sorted_batches)
    assert la == pytest.approx(lb, rel=1e-6)
    v = [torch.randn(g.shape, generator=torch.Generator().manual_seed(k)) for k, g in enumerate(ga)]
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(curvature.hvp(model, given, v), curvature.hvp(model, sorted_batches, v)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    with pytest.raises(UsageError, match="rows=0"):
        heldout.by_length(given, 0)


# ------------------------------------------------------------------------- the tokenizer's EOS
def test_held_out_responses_end_with_the_models_eos(tokenizer):
    """Every response ends with the EOS that the model's config and the GGUF file name (id 2,
    <|im_end|>), the token that transformers 5.17's conversion replaced by <|im_start|>."""
    config = json.loads((models.converted_dir("smollm2-135m") / "config.json").read_text())
    assert tokenizer.eos_token_id == config["eos_token_id"] == 2
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(models._gguf_path(models.model_spec("smollm2-135m"))))
    field = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(field.parts[field.data[0]][0]) == tokenizer.eos_token_id
    row = formatting.tokenize([{"prompt": "Say hi.", "response": "Hi."}], tokenizer, max_length=64)
    assert row["input_ids"][-1] == row["labels"][-1] == 2


def test_a_tokenizer_with_another_eos_is_given_the_configs(tokenizer):
    import copy

    from transformers import LlamaConfig

    bad = copy.deepcopy(tokenizer)
    bad.eos_token = "<|im_start|>"  # what transformers 5.17 made of the GGUF
    bad.pad_token = None
    models.match_special_tokens(bad, LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2))
    assert (bad.bos_token_id, bad.eos_token_id, bad.pad_token_id) == (1, 2, 2)


def test_a_conversion_with_another_eos_is_not_prepared(tmp_path):
    """A cached conversion made by transformers 5.17 (eos <|im_start|>) is converted again, not used."""
    src = models.converted_dir("smollm2-135m")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert models._prepared(tmp_path)
    tok_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tok_config["eos_token"] = "<|im_start|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert not models._prepared(tmp_path)


# ------------------------------------------------------------------------- flatness apart from forgetting
def test_every_landscape_sits_on_examples_the_held_out_losses_never_see(tokenizer):
    """Flatness is measured on examples disjoint from those that measure forgetting, in every preset but the
    superseded cpu-pilot: the paper-table entries (stage1, s2-*) as well as the frontier's end points. Checked
    on the examples themselves for smoke's (its sets are small enough to tokenise here), and on every preset's
    specs."""
    from cfsam.pipeline import runner
    from cfsam.pipeline.presets import preset_names
    from cfsam.pipeline.specs import expand

    with_landscape = {(p, n): e["measure"] for p in preset_names() for n, e in expand(p).items()
                      if "landscape" in e["measure"]}
    assert ("cpu", "stage1") in with_landscape and ("cpu", "s2-open-platypus-sam") in with_landscape
    shared = {p for (p, n), m in with_landscape.items()
              if m["landscape"]["dataset"] in m.get("heldout", {}).get("datasets", [])
              and not m["landscape"].get("disjoint")}
    assert shared == {"cpu-pilot"}  # only the superseded study keeps its own (`disjoint: false`, its kept ids)
    for name in ("stage1", "s2-open-platypus-sam"):
        m = with_landscape[("smoke", name)]
        h, ls = m["heldout"], m["landscape"]
        measured = heldout.heldout_batches(ls["dataset"], tokenizer, n_examples=h["n"], batch_size=h["n"],
                                           max_length=h["max_length"], seed=h["seed"])
        seen = {tuple(r[r != tokenizer.pad_token_id].tolist()) for b in measured for r in b["input_ids"]}
        flat = [tuple(r[r != tokenizer.pad_token_id].tolist()) for b in runner.landscape_batches(m, tokenizer)
                for r in b["input_ids"]]
        assert len(seen) == h["n"] and len(set(flat)) == ls["n_examples"]
        assert not seen & set(flat)
