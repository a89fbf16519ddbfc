"""LoRA and QLoRA in train.py: only the adapters (and the added pad row) train, the adapter reloads with PEFT to the
same logits, merging gives the same logits again, QLoRA's base really is 4-bit, and what cannot take an adapter says so."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from instructune.cli import main
from instructune.modeling import models

from conftest import PYTHON, assert_same_tensors, run_command, training_loss
from test_train import tiny_run_flags

PROBE = "Below is an instruction that describes a task. Write a response.\n\n### Instruction:\nSay hi.\n\n### Response:"


class Snapshot(TrainerCallback):
    """The parameters at the start and end of training, and the logits on PROBE at the end."""

    def __init__(self, tokenizer_path):
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.before, self.after, self.logits, self.model = {}, {}, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.model = model

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=torch.tensor([self.tokenizer(PROBE).input_ids])).logits.float()


def lora_run(model_path, output_dir, *extra, steps=10):
    from instructune.cli import run, train

    snapshot = Snapshot(model_path)
    flags = tiny_run_flags(model_path, output_dir, steps=steps, learning_rate=5e-2) + [
        "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0", "--lora_target_modules", "all-linear", *extra]
    assert run(lambda: train.main(flags, callbacks=[snapshot])) == 0
    return snapshot, json.loads((output_dir / "train_results.json").read_text())


def logits_of(model, tokenizer):
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([tokenizer(PROBE).input_ids])).logits.float()


def base_resized(model_path, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    added = len(tokenizer) - base.get_input_embeddings().weight.shape[0]
    if added:
        models.resize_embeddings(base, tokenizer, added)
    return base


@pytest.mark.slow  # a launched process
@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_opt"])
def test_lora_trains_only_adapters_reloads_and_merges_to_the_same_logits(model_fixture, request, tmp_path):
    model_path = request.getfixturevalue(model_fixture)
    output_dir = tmp_path / "out"
    snapshot, summary = lora_run(model_path, output_dir, "--merge_adapter", "True")

    changed = {n for n in snapshot.before if not torch.equal(snapshot.before[n], snapshot.after[n])}
    assert changed and all("lora_" in n or "trainable_tokens" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)
    if model_fixture == "tiny_llama":  # its pad token was added: that row (and only it) is trainable and saved
        trainable = [n for n, p in snapshot.model.named_parameters() if p.requires_grad and "lora_" not in n]
        assert len(trainable) == 1 and "trainable_tokens_delta" in trainable[0]
        assert json.loads((output_dir / "adapter_config.json").read_text())["trainable_token_indices"] == [
            len(AutoTokenizer.from_pretrained(output_dir)) - 1]

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    reloaded = PeftModel.from_pretrained(base_resized(model_path, tokenizer), output_dir)
    torch.testing.assert_close(logits_of(reloaded, tokenizer), snapshot.logits, rtol=0, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits_of(merged, tokenizer), snapshot.logits, rtol=0, atol=1e-5)
    # it learned: the training records fit better than with the base (a random tiny model: near-uniform at first)
    assert training_loss(merged, tokenizer) < training_loss(base_resized(model_path, tokenizer), tokenizer) - 0.05
    assert AutoTokenizer.from_pretrained(output_dir / "merged").pad_token == tokenizer.pad_token

    # instructune merge afterwards writes the same model, and generate takes the adapter folder as it is
    result = run_command([PYTHON, "-m", "instructune.cli", "merge", "--base", str(model_path), "--adapter",
                          str(output_dir), "--output", str(tmp_path / "merged-later")])
    assert result.returncode == 0, result.stderr[-2000:]
    later = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-later", dtype=torch.float32)
    assert_same_tensors(later.state_dict(), merged.state_dict())
    from instructune.inference.engine import load

    torch.testing.assert_close(logits_of(load(str(output_dir)).model, tokenizer), snapshot.logits, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_base_is_quantised_and_its_adapter_merges_into_the_full_precision_base(bits, tiny_llama, tmp_path):
    import bitsandbytes

    output_dir = tmp_path / "out"
    snapshot, summary = lora_run(tiny_llama, output_dir, f"--load_in_{bits}bit", "True", "--merge_adapter", "True")
    layer = bitsandbytes.nn.Linear4bit if bits == 4 else bitsandbytes.nn.Linear8bitLt
    quantised = [m for m in snapshot.model.modules() if isinstance(m, layer)]
    assert quantised
    if bits == 4:  # QLoRA: NF4 with double quantisation
        assert all(m.weight.quant_state.nested and m.weight.quant_state.quant_type == "nf4" for m in quantised)
    else:
        assert all(m.weight.dtype == torch.int8 for m in quantised)
    # merged into the unquantised base (never into the 4-bit one): equal to the adapter on that base, and it learned
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    on_full_base = PeftModel.from_pretrained(base_resized(tiny_llama, tokenizer), output_dir)
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged", dtype=torch.float32)
    # (fp32 round-off of x·(W + s·B·A) against x·W + s·x·A·B; an adapter fitted to a quantised base is larger)
    torch.testing.assert_close(logits_of(merged, tokenizer), logits_of(on_full_base, tokenizer), rtol=0, atol=2e-5)
    assert training_loss(merged, tokenizer) < training_loss(base_resized(tiny_llama, tokenizer), tokenizer) - 0.05
    assert summary["losses"][-1]["loss"] < summary["losses"][0]["loss"]


@pytest.mark.slow
def test_an_adapter_resumes_to_the_uninterrupted_result(tiny_llama, tmp_path):
    lora_run(tiny_llama, tmp_path / "whole", "--save_strategy", "steps", "--save_steps", "4", steps=8)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", interrupted / "checkpoint-4")
    lora_run(tiny_llama, interrupted, "--save_strategy", "steps", "--save_steps", "4", "--resume_from_checkpoint", "auto",
             steps=8)
    from safetensors.torch import load_file

    whole, resumed = (load_file(f / "adapter_model.safetensors") for f in (tmp_path / "whole", interrupted))
    assert whole.keys() == resumed.keys()
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6


@pytest.mark.slow  # trains (the fast tier trains nothing)
def test_what_takes_no_adapter_says_so(tiny_llama, tiny_opt, tmp_path, capsys):
    lora_run(tiny_llama, tmp_path / "out", steps=2)
    capsys.readouterr()

    def refused(*command) -> str:
        assert main(list(command)) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    # another model's base
    assert "does not have" in refused("merge", "--base", str(tiny_opt), "--adapter", str(tmp_path / "out"), "--output",
                                      str(tmp_path / "wrong"))
    assert not (tmp_path / "wrong").exists()
    for command in (["shard", str(tmp_path / "out"), str(tmp_path / "x")],
                    ["diff", "make", "--path_raw", str(tiny_llama), "--path_tuned", str(tmp_path / "out"),
                     "--path_diff", str(tmp_path / "d")]):
        assert "a LoRA adapter, not a model; merge it" in refused(*command)
    checkpoint = tmp_path / "checkpoint-2"  # a LoRA run's checkpoint: its adapter is complete already
    shutil.copytree(tmp_path / "out", checkpoint)
    assert "a LoRA checkpoint" in refused("convert", str(checkpoint), str(tmp_path / "c"))
    flags = tiny_run_flags(tiny_llama, tmp_path / "q", steps=1)
    assert main(["train", *flags, "--load_in_4bit", "True"]) == 2  # a quantised base needs adapters
    assert main(["train", *flags, "--merge_adapter", "True"]) == 2
    assert not (tmp_path / "q").exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_lora_on_two_processes_merges_to_the_ddp_model(strategy, tiny_llama, ranks, tmp_path):
    """2 ranks: the same adapter, merged, under DDP and under ZeRO-2, ZeRO-3 (every weight really partitioned:
    stage3_param_persistence_threshold 0) or FSDP; the pad row that training added is saved either way."""
    from conftest import REPO

    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(config))
    sharded = ["--deepspeed", str(tmp_path / "z3.json")] if strategy == "zero3" else ["--strategy", strategy]
    merged = {}
    for name, extra in (("ddp", []), (strategy, sharded)):
        # gentle, as the full fine-tuning strategy tests: AdamW magnifies reduction-order round-off at high rates
        flags = tiny_run_flags(tiny_llama, tmp_path / name, steps=6, learning_rate=1e-2) + [
            "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0", "--lora_target_modules", "all-linear",
            "--merge_adapter", "True", *extra]
        result = ranks.torchrun("train.py", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "LoRA r=8" in result.stderr
        merged[name] = AutoModelForCausalLM.from_pretrained(tmp_path / name / "merged", dtype=torch.float32).state_dict()
        summary = json.loads((tmp_path / name / "train_results.json").read_text())
        assert summary["world_size"] == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    moved = max((merged["ddp"][k][: len(base[k])] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # the adapters changed the model...
    difference = max((merged["ddp"][k] - merged[strategy][k]).abs().max().item() for k in merged["ddp"])
    assert difference < 1e-5, difference  # ...and identically on both strategies
