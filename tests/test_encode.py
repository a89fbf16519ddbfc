"""Tokenisation and label masking: the unmasked labels of an instruction record are exactly `output + eos`, EOS is learned even
when pad == eos, padding is never a target, and over-long records are truncated or dropped as asked."""

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from instructune.data import IGNORE_INDEX, encode_conversations, load_conversations, render_prompt
from instructune.data.encode import token_ids
from instructune.data.formats import instruction
from instructune.modeling import models

from conftest import SAMPLE_DATA


def _tokenizer(path, pad_token="[PAD]"):
    tokenizer = models.load_tokenizer(str(path))
    models.add_missing_special_tokens(tokenizer, pad_token)
    return tokenizer


def record(text, context, output):
    return instruction(text, context, output, "alpaca", "test")


def _check_labels(records, tokenizer, template):
    examples, stats = encode_conversations(records, tokenizer, template, max_length=4096)
    assert stats.kept == len(records) and stats.truncated == stats.dropped == 0
    for record, example in zip(records, examples):
        targets = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
        assert tokenizer.decode(targets) == record.messages[-1].content + tokenizer.eos_token
        assert example["labels"][-1] == tokenizer.eos_token_id  # EOS is a target
        # The prompt part is exactly the prompt as tokenised at generation time.
        prompt_length = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        prompt = render_prompt(template, list(record.messages[:-1]), tokenizer)
        assert example["input_ids"][:prompt_length] == tokenizer(prompt, add_special_tokens=template == "alpaca").input_ids


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_opt"])
def test_token_ids_are_the_tokenizers_own(model, request):
    """The Rust backend called directly gives the ids a plain call gives, with and without special tokens; after a
    call that left truncation set on the backend, the plain call is used (a direct call would truncate)."""
    tokenizer = _tokenizer(request.getfixturevalue(model))
    texts = ["Give three tips for staying healthy.", "  leading space and\ttab\n\nnewlines ", "Ünïcödé — 東京 🙂",
             f"special tokens as text: {tokenizer.eos_token}{tokenizer.pad_token} end", ""]
    for flag in (True, False):
        assert token_ids(tokenizer, texts, flag) == tokenizer(texts, add_special_tokens=flag)["input_ids"]
    tokenizer(texts, truncation=True, max_length=2)
    assert tokenizer.backend_tokenizer.truncation is not None
    after = token_ids(tokenizer, texts, False)
    assert after == tokenizer(texts, add_special_tokens=False)["input_ids"] and max(map(len, after)) > 2


def test_labels_are_the_response_and_eos_tiny_llama(tiny_llama):
    tokenizer = _tokenizer(tiny_llama)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id != tokenizer.eos_token_id
    _check_labels(load_conversations(str(SAMPLE_DATA)), tokenizer, "alpaca")


@pytest.mark.slow
@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_labels_with_pad_equal_to_eos_smollm2(smollm2, template):
    tokenizer = _tokenizer(smollm2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap: masking pad would mask EOS
    records = load_conversations(str(SAMPLE_DATA))
    _check_labels(records, tokenizer, template)
    # ... and after batching, EOS is still a target while the padding after it is not.
    examples, _ = encode_conversations(records[:8], tokenizer, template, max_length=512)
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)(examples)
    for labels, mask, example in zip(batch["labels"], batch["attention_mask"], examples):
        length = len(example["input_ids"])
        assert labels[length - 1] == tokenizer.eos_token_id
        assert torch.all(labels[length:] == IGNORE_INDEX) and torch.all(mask[length:] == 0)
        assert torch.all(mask[:length] == 1)


def test_train_on_inputs_learns_the_prompt_too(tiny_llama):
    tokenizer = _tokenizer(tiny_llama)
    records = load_conversations(str(SAMPLE_DATA))[:5]
    examples, _ = encode_conversations(records, tokenizer, "alpaca", 512, train_on_inputs=True)
    assert all(e["labels"] == e["input_ids"] for e in examples)


def test_overlong_records_are_truncated_or_dropped(tiny_llama):
    tokenizer = _tokenizer(tiny_llama)
    short = record("Say hi.", "", "Hi.")
    long = record("Repeat the word.", "", "word " * 300)
    huge_prompt = record("word " * 300, "", "ok")
    examples, stats = encode_conversations([short, long, huge_prompt], tokenizer, "alpaca", max_length=128)
    assert (stats.kept, stats.truncated, stats.dropped) == (2, 1, 1)  # no response left of the huge prompt
    assert [len(e["input_ids"]) for e in examples][1] == 128
    assert stats.longest > 300
    examples, stats = encode_conversations([short, long], tokenizer, "alpaca", max_length=128, overlong="drop")
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 0, 1)


def test_pad_token_is_added_with_mean_rows_or_reused(tiny_llama, tiny_opt):
    tokenizer = models.load_tokenizer(str(tiny_llama))
    before = models.load_model(str(tiny_llama))
    old_rows = before.get_input_embeddings().weight.shape[0]
    added = models.add_missing_special_tokens(tokenizer, "[PAD]")
    assert added == 1 and tokenizer.pad_token == "[PAD]"
    models.resize_embeddings(before, tokenizer, added)
    for weight in (before.get_input_embeddings().weight, before.get_output_embeddings().weight):
        assert weight.shape[0] == old_rows + 1
        torch.testing.assert_close(weight[-1], weight[:-1].mean(0), rtol=0, atol=1e-7)

    reused = models.load_tokenizer(str(tiny_llama))
    assert models.add_missing_special_tokens(reused, "<unk>") == 0
    assert reused.pad_token == "<unk>" and len(reused) == old_rows

    opt_tokenizer = models.load_tokenizer(str(tiny_opt))  # has <pad>: nothing to add
    assert models.add_missing_special_tokens(opt_tokenizer, "[PAD]") == 0 and opt_tokenizer.pad_token == "<pad>"
