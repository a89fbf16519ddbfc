"""Adapters are checked against their weights and their base (#20 §6, §7): a config rank that is not the weights'
rank, target_modules that name none of the adapter's weights, a base of the same names but other shapes: `merge`
and `generate --adapter` both refuse in the same one line and write nothing, where they used to disagree (merge:
half the update; generate: the adapter silently dropped) or fail with a traceback."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from instructune.cli import main

from conftest import _tiny_model

pytestmark = pytest.mark.slow  # a model loaded or built per test: the full suite's tier


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    """A rank-4 LoRA adapter on q_proj and v_proj of tiny_llama, with non-zero B (so merging changes weights)."""
    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()
    model.save_pretrained(folder)
    for file in tiny_llama.glob("tokenizer*"):
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def smaller_base(tmp_path_factory):
    """A LLaMA of the same tensor names as tiny_llama but half its width."""
    return _tiny_model(tmp_path_factory.mktemp("smaller"), False, "LlamaConfig", hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def edited(adapter, tmp_path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(config | changes))
    return copy


def both_refuse(base, adapter, tmp_path, capsys, expected: str) -> None:
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(out)]) == 2
    merge_error = capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
    assert main(["generate", "--model_name_or_path", str(base), "--adapter", str(adapter), "--instruction", "Hi.",
                 "--max_new_tokens", "2"]) == 2
    generate_error = capsys.readouterr().err.strip().splitlines()[-1]
    assert merge_error == generate_error == f"error: {adapter}: {expected}"


def test_the_genuine_adapter_merges_and_generates(tiny_llama, adapter, tmp_path, capsys):
    assert main(["merge", "--base", str(tiny_llama), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    assert main(["generate", "--model_name_or_path", str(tiny_llama), "--adapter", str(adapter), "--instruction", "Hi.",
                 "--max_new_tokens", "2"]) == 0


def test_a_rank_that_is_not_the_weights_is_refused(tiny_llama, adapter, tmp_path, capsys):
    """Seen: r=8 in adapter_config.json on rank-4 weights merged half the update, exit 0."""
    both_refuse(tiny_llama, edited(adapter, tmp_path, r=8), tmp_path, capsys,
                "model.layers.0.self_attn.q_proj's LoRA weights are (4, 64) and (64, 4); rank 8 (adapter_config.json) "
                f"on {tiny_llama}'s (64, 64) weight needs (8, 64) and (64, 8)")


def test_target_modules_that_name_none_of_the_weights_are_refused(tiny_llama, adapter, tmp_path, capsys):
    """Seen: generate --adapter silently dropped such an adapter while merge applied it."""
    both_refuse(tiny_llama, edited(adapter, tmp_path, target_modules=["k_proj"]), tmp_path, capsys,
                "adapts model.layers.0.self_attn.q_proj, which its target_modules ['k_proj'] do not name")


def test_a_base_of_the_same_names_but_other_shapes_is_refused(adapter, smaller_base, tmp_path, capsys):
    """Seen: merge into a smaller base of the same names ended in a traceback."""
    both_refuse(smaller_base, adapter, tmp_path, capsys,
                "model.layers.0.self_attn.q_proj's LoRA weights are (4, 64) and (64, 4); rank 4 (adapter_config.json) "
                f"on {smaller_base}'s (32, 32) weight needs (4, 32) and (32, 4)")
