"""Tokenised data is cached: a second run loads exactly what the first computed, and anything that changes the
result (data, tokenizer, template, max length, train_on_inputs) misses."""

import dataclasses
import logging

import pytest

from instructune.cli import main
from instructune.data import encode_conversations, load_conversations
from instructune.data.cache import encode_cached
from instructune.modeling import models

from conftest import SAMPLE_DATA
from test_train import tiny_run_flags


def tokenizer(path):
    loaded = models.load_tokenizer(str(path))
    models.add_missing_special_tokens(loaded, "[PAD]")
    return loaded


@pytest.fixture
def conversations():
    return load_conversations(str(SAMPLE_DATA))


def test_a_second_run_loads_what_the_first_computed(tiny_llama, conversations, tmp_path):
    llama = tokenizer(tiny_llama)
    expected = encode_conversations(conversations, llama, "alpaca", 256)
    first = encode_cached(conversations, llama, "alpaca", 256, False, "truncate", tmp_path)
    llama("some text", truncation=True, max_length=8, padding="max_length")  # leaves settings on the tokenizer
    second = encode_cached(conversations, llama, "alpaca", 256, False, "truncate", tmp_path)
    assert (first[2], second[2]) == (False, True)
    assert first[:2] == second[:2] == expected  # the same examples and statistics, truncation included
    assert expected[1].truncated > 0
    assert len(list(tmp_path.iterdir())) == 1


def test_what_changes_the_result_misses(tiny_llama, tiny_opt, conversations, tmp_path):
    llama = tokenizer(tiny_llama)
    base = ("alpaca", 256, False, "truncate")
    assert not encode_cached(conversations, llama, *base, tmp_path)[2]
    changed_record = dataclasses.replace(conversations[3], messages=conversations[3].messages[:1] + (
        dataclasses.replace(conversations[3].messages[1], content="A different answer."),))
    with_new_token = tokenizer(tiny_llama)
    with_new_token.add_tokens(["<new>"])
    with_chat_template = tokenizer(tiny_llama)  # the tiny tokenizer has none, so that 'chat' can render
    with_chat_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    variants = {
        "another tokenizer": (conversations, tokenizer(tiny_opt), *base),
        "the same tokenizer with a token more": (conversations, with_new_token, *base),
        "a chat template": (conversations, with_chat_template, *base),
        "another prompt template": (conversations, with_chat_template, "chat", 256, False, "truncate"),
        "another max length": (conversations, llama, "alpaca", 128, False, "truncate"),
        "train_on_inputs": (conversations, llama, "alpaca", 256, True, "truncate"),
        "overlong drop": (conversations, llama, "alpaca", 256, False, "drop"),
        "one record changed": (conversations[:3] + [changed_record] + conversations[4:], llama, *base),
        "a subset": (conversations[:50], llama, *base),
    }
    for name, arguments in variants.items():
        assert not encode_cached(*arguments, tmp_path)[2], name
    assert encode_cached(conversations, llama, *base, tmp_path)[2]  # and the original still hits
    assert len(list(tmp_path.iterdir())) == 1 + len(variants)


def test_a_folder_without_its_marker_is_not_a_cache(tiny_llama, conversations, tmp_path):
    """A run killed after writing the data but before marking it complete: the next run tokenises again."""
    llama = tokenizer(tiny_llama)
    encode_cached(conversations, llama, "alpaca", 256, False, "truncate", tmp_path)
    (folder,) = tmp_path.iterdir()
    (folder / "complete").unlink()
    examples, _, hit = encode_cached(conversations, llama, "alpaca", 256, False, "truncate", tmp_path)
    assert not hit and (folder / "complete").exists()
    assert examples == encode_conversations(conversations, llama, "alpaca", 256)[0]


@pytest.mark.slow  # trains (the fast tier trains nothing)
def test_training_says_hit_or_miss(tiny_llama, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="instructune")
    for run in ("first", "second"):
        flags = tiny_run_flags(tiny_llama, tmp_path / run, steps=1) + ["--tokenized_cache_dir", str(tmp_path / "cache"),
                                                                          "--preprocessing_num_workers", "2"]
        assert main(["train", *flags]) == 0
    assert "cache miss" in caplog.text and "cache hit" in caplog.text
