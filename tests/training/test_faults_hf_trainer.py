"""Issue 27, friction: SAMTrainer pads its examples without a data_collator passed by hand, and resuming a model
with tied embeddings does not report the tied head as a missing key."""
import copy
import logging

import torch
from datasets import Dataset
from transformers import TrainingArguments

from cfsam.data.formatting import IGNORE, collate
from cfsam.training.hf_trainer import SAMTrainer


def _data(vocab: int, n: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * 3 + ids[3:]})  # of different lengths
    return Dataset.from_list(rows)


def _args(out, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                             lr_scheduler_type="constant", report_to="none", use_cpu=True, disable_tqdm=True,
                             train_sampling_strategy="sequential", seed=0, **kw)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_no_data_collator_pads_like_cfsams_collate(tiny, tmp_path):
    data = _data(tiny.model.config.vocab_size)
    ours = SAMTrainer(model=copy.deepcopy(tiny.model), args=_args(tmp_path / "a", save_strategy="no"),
                      train_dataset=data, processing_class=tiny.tokenizer, rho=0.5)
    pad = tiny.tokenizer.pad_token_id
    theirs = SAMTrainer(model=copy.deepcopy(tiny.model), args=_args(tmp_path / "b", save_strategy="no"),
                        train_dataset=data, data_collator=lambda f: collate(f, pad), rho=0.5)
    ours.train()
    theirs.train()
    a, b = _weights(ours.model), _weights(theirs.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_tied_embeddings_reports_no_missing_key(tiny, tmp_path, caplog):
    assert tiny.model.config.tie_word_embeddings
    data = _data(tiny.model.config.vocab_size)
    args = _args(tmp_path, save_strategy="steps", save_steps=1)
    pad = tiny.tokenizer.pad_token_id
    kw = dict(args=args, train_dataset=data, data_collator=lambda f: collate(f, pad), rho=0.5)
    SAMTrainer(model=copy.deepcopy(tiny.model), **kw).train()
    resumed = SAMTrainer(model=copy.deepcopy(tiny.model), **kw)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert "missing keys" not in caplog.text
    model = resumed.model
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
