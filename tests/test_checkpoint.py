"""`instructune shard` and `instructune convert`: re-sharding is bitwise, and ZeRO-2/3 checkpoints convert to a
Hugging Face folder equal to the trained fp32 weights, for LLaMA and OPT (tied embeddings)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructune.checkpoint.shard import reshard
from instructune.checkpoint.tensorio import TensorFolder
from instructune.cli import main
from instructune.errors import UserError
from instructune.inference.answers import answer
from instructune.inference.engine import Sampling, wrap

from conftest import PYTHON, REPO, assert_same_tensors, run_command
from test_train import tiny_run_flags


def tensors(folder) -> dict[str, torch.Tensor]:
    reader = TensorFolder(folder)
    return {name: reader.get(name) for name in reader.names()}


def test_reshard_bin_to_safetensors_and_back_bitwise(tiny_opt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_opt)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)  # pytorch_model.bin, read with weights_only
    original = tensors(tmp_path / "bin")
    assert reshard(tmp_path / "bin", tmp_path / "sharded", max_shard_size="100KB") == len(original)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reshard(tmp_path / "sharded", tmp_path / "single", max_shard_size="1GB")
    assert (tmp_path / "single" / "model.safetensors").exists()
    for folder in ("sharded", "single"):
        assert_same_tensors(tensors(tmp_path / folder), original)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "single")
    assert_same_tensors(reloaded.state_dict(), model.state_dict())


def test_reshard_to_bf16(tiny_llama, tmp_path):
    assert main(["shard", str(tiny_llama), str(tmp_path / "bf16"), "--dtype", "bf16", "--max_shard_size", "200KB"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    original = tensors(tiny_llama)
    assert_same_tensors(tensors(tmp_path / "bf16"), {n: t.to(torch.bfloat16) for n, t in original.items()})
    assert (tmp_path / "bf16" / "tokenizer.json").exists()


def test_convert_refuses_what_it_cannot_read(tiny_llama, tmp_path, capsys):
    with pytest.raises(UserError, match="not a DeepSpeed ZeRO checkpoint"):
        from instructune.checkpoint.convert import convert_checkpoint

        convert_checkpoint(tiny_llama, tmp_path / "out")
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ") and not (tmp_path / "out").exists()


def check_zero_checkpoint_converts(checkpoint, trained_dir, destination, tied: bool, script: bool) -> None:
    """A ZeRO checkpoint taken at the last step converts (`instructune convert`; with `script`, through
    scripts/zero_to_hf.sh in its own process) to the trained model: the same fp32 weights (the checkpoint holds the
    fp32 master weights), tied weights stored once, the same answers. Called by test_distributed.py's ZeRO-2/3 runs
    of LLaMA and OPT, which save that checkpoint."""
    from transformers import AutoTokenizer

    assert any(checkpoint.glob("global_step*"))
    flags = [str(checkpoint), str(destination), "--max_shard_size", "200KB"]
    if script:
        converted = run_command(["bash", "scripts/zero_to_hf.sh", *flags], PYTHON=PYTHON)
        assert converted.returncode == 0, converted.stderr[-3000:]
    else:
        assert main(["convert", *flags]) == 0
    trained = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(destination, dtype=torch.float32)
    assert_same_tensors(loaded.state_dict(), trained.state_dict())
    if tied:  # stored once, still tied after loading
        assert "lm_head.weight" not in tensors(destination)
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    # the converted folder answers as the trained model does (its tokenizer and config came along)
    tokenizer, trained_tokenizer = AutoTokenizer.from_pretrained(destination), AutoTokenizer.from_pretrained(trained_dir)
    six = Sampling(max_new_tokens=6)
    assert answer(wrap(loaded, tokenizer), "Say hi.", sampling=six) == answer(wrap(trained, trained_tokenizer), "Say hi.", sampling=six)
    assert len(tokenizer) == len(trained_tokenizer) == loaded.get_input_embeddings().weight.shape[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_sharded_checkpoint_converts_and_final_model_is_saved(tiny_llama, ranks, tmp_path):
    """With state_dict_type SHARDED_STATE_DICT the Trainer alone saves no final weights; ours does, and the
    sharded checkpoint (torch distributed-checkpoint format) converts to the same weights."""
    fsdp_config = json.loads((REPO / "ds_configs" / "fsdp_full_shard.json").read_text())
    fsdp_config["state_dict_type"] = "SHARDED_STATE_DICT"
    (tmp_path / "fsdp.json").write_text(json.dumps(fsdp_config))
    trained = ranks.torchrun("train.py", *tiny_run_flags(tiny_llama, tmp_path / "out", steps=8), "--fsdp",
                             "full_shard auto_wrap", "--fsdp_config", str(tmp_path / "fsdp.json"),
                             "--save_strategy", "steps", "--save_steps", "8")
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = tmp_path / "out" / "checkpoint-8"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "config.json").exists()
    assert main(["convert", str(checkpoint), str(tmp_path / "hf")]) == 0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
    assert_same_tensors(loaded, final)
