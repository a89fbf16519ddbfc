"""Single-process training on tiny models: the loss falls and the output is a Hugging Face folder that
loads back, equal to the trained weights, and generates."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructune.cli import main, run, train
from instructune.inference.answers import answer
from instructune.inference.engine import Sampling, wrap

from conftest import SAMPLE_DATA, assert_same_tensors, training_loss
from helpers.probe import ProbeTraining, read_probes


def tiny_run_flags(model: Path, output_dir: Path, steps: int = 40, learning_rate: float = 2e-3) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--data_path", str(SAMPLE_DATA), "--output_dir", str(output_dir),
        "--max_steps", str(steps), "--per_device_train_batch_size", "8", "--learning_rate", str(learning_rate),
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--model_max_length", "256", "--max_shard_size", "200KB", "--disable_tqdm", "True", "--seed", "1",
    ]


def check_model_folder(output_dir: Path, base: Path, world_size: int = 1, loss_drop: float = 0.5) -> dict:
    """The folder is a complete, sharded Hugging Face model that loads, fits its training data better than the
    base model did, and generates differently from it; returns the run summary."""
    index = json.loads((output_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((output_dir / shard).exists() for shard in shards)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "loss_curve.png"):
        assert (output_dir / name).exists(), name
    assert (output_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((output_dir / "train_results.json").read_text())
    assert summary["world_size"] == world_size
    losses = [e["loss"] for e in summary["losses"]]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - loss_drop, losses  # the loss falls (nats)

    model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    weights = {}
    for shard in shards:
        weights.update(load_file(output_dir / shard))
    state = model.state_dict()
    assert_same_tensors({name: state[name] for name in weights}, weights)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the pad token training added
    assert training_loss(model, tokenizer) < training_loss(base_model, tokenizer) - loss_drop
    question = "Give three tips for staying healthy."
    eight = Sampling(max_new_tokens=8)
    assert answer(wrap(model, tokenizer), question, sampling=eight) != answer(wrap(base_model, tokenizer), question, sampling=eight)
    return summary


@pytest.mark.slow  # trains (the fast tier trains nothing)
@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_opt"])
def test_training_writes_a_loadable_model_folder(model_fixture, request, tmp_path):
    model = request.getfixturevalue(model_fixture)
    output_dir = tmp_path / "out"
    assert main(["train", *tiny_run_flags(model, output_dir)]) == 0
    summary = check_model_folder(output_dir, model)
    assert summary["strategy"] == "single-process"
    assert summary["data"]["kept"] == summary["data"]["records"] == 125
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.pad_token == ("[PAD]" if model_fixture == "tiny_llama" else "<pad>")


@pytest.mark.slow
def test_alpaca_flags_train_with_bf16_and_gradient_checkpointing(tiny_llama, tmp_path):
    output_dir = tmp_path / "out"
    flags = tiny_run_flags(tiny_llama, output_dir) + [
        "--bf16", "True", "--tf32", "True", "--evaluation_strategy", "no", "--warmup_ratio", "0.03",
        "--gradient_checkpointing", "True", "--weight_decay", "0.",
    ]
    assert run(lambda: train.main(flags, callbacks=[ProbeTraining(tmp_path)])) == 0
    check_model_folder(output_dir, tiny_llama)
    assert read_probes(tmp_path) == [{"gradient_checkpointing": True, "forward_dtype": "bfloat16"}]
    # fp32 master weights are saved even though the forward pass ran in bf16
    assert json.loads((output_dir / "config.json").read_text())["dtype"] == "float32"
