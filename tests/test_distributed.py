"""torchrun with 2 processes on the CPU (gloo): really data-parallel, same weights on both ranks, the loss
falls and the saved folder loads. Each test launches one 2-process job; they run one after another."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, SAMPLE_DATA, run_command
from test_train import check_model_folder, tiny_run_flags

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Stanford Alpaca's README command, adapted only by paths and sizes (tf32 and all).
ALPACA_FLAGS = [
    "--bf16", "True", "--num_train_epochs", "1", "--per_device_eval_batch_size", "4",
    "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "steps",
    "--save_steps", "2000", "--save_total_limit", "1", "--weight_decay", "0.", "--warmup_ratio", "0.03",
    "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
]


def torchrun(script: str, *args: str, port: int):
    return run_command(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), script, *args]
    )


def test_torchrun_ddp_trains_data_parallel_with_identical_ranks(tiny_llama, tmp_path):
    output_dir = tmp_path / "out"
    result = torchrun(
        "tests/helpers/train_and_dump.py", str(tmp_path), *tiny_run_flags(tiny_llama, output_dir), port=29511
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_model_folder(output_dir, world_size=2)
    assert summary["strategy"] == "ddp" and summary["model_wrapper"] == "DistributedDataParallel"
    # 40 steps of 8 records on each of 2 ranks: twice the data of one process
    assert summary["metrics"]["epoch"] == pytest.approx(40 * 8 * 2 / 125, rel=0.05)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)


def test_alpaca_fsdp_command_trains_with_real_fsdp(tiny_llama, tmp_path):
    output_dir = tmp_path / "out"
    flags = tiny_run_flags(tiny_llama, output_dir) + ALPACA_FLAGS + [
        "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
    ]
    result = torchrun("train.py", *flags, port=29512)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--evaluation_strategy is --eval_strategy" in result.stderr
    assert "--tf32 ignored" in result.stderr
    summary = check_model_folder(output_dir, world_size=2)
    assert summary["strategy"] == "fsdp" and summary["model_wrapper"].startswith("FSDP")
