"""bf16 on the CPU is checked before the first step: the first batch's loss in bf16 against fp32's decides."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructune.data import encode_conversations, load_conversations
from instructune.data.batching import Collator
from instructune.errors import ConfigError
from instructune.training import precision

from conftest import SAMPLE_DATA


class Args:
    per_device_train_batch_size, device, deepspeed, bf16, mixed_precision = 4, torch.device("cpu"), None, True, "bf16"


@pytest.fixture(scope="module")
def batch_parts(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.unk_token
    examples, _ = encode_conversations(load_conversations(str(SAMPLE_DATA))[:4], tokenizer, "alpaca", 128)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), Collator(tokenizer), examples


def test_the_two_losses_are_the_models_own_in_each_precision(batch_parts):
    model, collator, examples = batch_parts
    batch = collator(examples)
    model.train()  # as the Trainer hands it over: put back in training mode after the check
    fp32, bf16 = precision.first_batch_losses(model, batch)
    assert model.training
    model.eval()
    with torch.no_grad():
        assert fp32 == model(**batch).loss.item()
    assert bf16 != fp32 and abs(bf16 - fp32) / fp32 < precision.TOLERANCE


def test_a_loss_bf16_changes_trains_in_fp32_or_stops_under_deepspeed(batch_parts, monkeypatch, caplog):
    model, collator, examples = batch_parts
    caplog.set_level("INFO", logger="instructune")
    args = Args()
    precision.check_bf16_on_cpu(args, model, collator, examples)
    assert args.bf16 and "training in bf16" in caplog.text
    monkeypatch.setattr(precision, "first_batch_losses", lambda model, batch: (2.0, 2.1))  # 5 % apart
    precision.check_bf16_on_cpu(args, model, collator, examples)
    assert not args.bf16 and args.mixed_precision == "no" and "training in fp32" in caplog.text
    args = Args()
    args.deepspeed = "zero2.json"
    with pytest.raises(ConfigError, match="changes this model's loss on the CPU by 5.0%"):
        precision.check_bf16_on_cpu(args, model, collator, examples)
