"""2 processes on the CPU (gloo), one job at a time: each strategy really is that strategy, the loss falls,
the saved folder loads, and DDP, ZeRO-2, ZeRO-3 and FSDP end with the same weights (fp32, same seed).
The jobs run in the test run's two pooled ranks (conftest's `ranks`); the launchers are launched for real:
torchrun (Alpaca's FSDP command), the deepspeed launcher and torchrun as 2 nodes on loopback (the Slurm script trains
in test_guard.py, preempted and requeued)."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from transformers import AutoModelForCausalLM

from instructune.checkpoint.tensorio import TensorFolder

from conftest import PYTHON, REPO, SCRIPTS, assert_same_tensors, run_command
from helpers.probe import read_probes
from test_checkpoint import check_zero_checkpoint_converts
from test_train import check_model_folder, tiny_run_flags

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WRAPPERS = {"ddp": "DistributedDataParallel", "zero2": "DeepSpeedEngine", "zero3": "DeepSpeedEngine", "fsdp": "FSDP"}
STRATEGY_NAMES = {"ddp": "ddp", "zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3", "fsdp": "fsdp"}

# Stanford Alpaca's README command, adapted only by paths and sizes (tf32 and all).
ALPACA_FLAGS = [
    "--bf16", "True", "--num_train_epochs", "1", "--per_device_eval_batch_size", "4",
    "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "steps",
    "--save_steps", "2000", "--save_total_limit", "1", "--weight_decay", "0.", "--warmup_ratio", "0.03",
    "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
]
_ports = iter(range(29510, 29600))


def torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_command(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(next(_ports)), script, *args]
    )


def weights(folder) -> dict[str, torch.Tensor]:
    """The model's weights as loaded (a DeepSpeed save also stores the tied lm_head; loading unties nothing)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def max_difference(a: dict, b: dict) -> float:
    assert a and a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


# Runs compared with DDP are short and gentle: Adam turns reduction-order round-off (1e-7) in near-zero
# gradients into lr-sized steps, so long runs at a high rate drift apart without anything being wrong.
def equivalence_flags(model, output_dir) -> list[str]:
    return tiny_run_flags(model, output_dir, steps=16, learning_rate=1e-3)


def train_with(model, output_dir, *flags, launcher, script="train.py", steps=None) -> dict:
    run_flags = equivalence_flags(model, output_dir) if steps is None else tiny_run_flags(model, output_dir, steps=steps)
    result = launcher(script, *run_flags, *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    return check_model_folder(output_dir, model, world_size=2, loss_drop=0.2)


@pytest.fixture(scope="module")
def ddp_weights(ranks, tmp_path_factory, tiny_llama, tiny_opt):
    """The DDP run of each tiny model (the reference), checked to be data-parallel with identical ranks."""
    runs = {}
    for name, model in (("llama", tiny_llama), ("opt", tiny_opt)):
        work = tmp_path_factory.mktemp(f"ddp-{name}")
        result = ranks.torchrun("tests/helpers/train_and_dump.py", str(work), *equivalence_flags(model, work / "out"))
        assert result.returncode == 0, result.stderr[-4000:]
        summary = check_model_folder(work / "out", model, world_size=2, loss_drop=0.2)
        assert summary["strategy"] == "ddp" and summary["model_wrapper"] == "DistributedDataParallel"
        assert summary["metrics"]["epoch"] == pytest.approx(16 * 8 * 2 / 125, rel=0.05)  # twice one process's data
        rank0, rank1 = load_file(work / "rank0.safetensors"), load_file(work / "rank1.safetensors")
        assert_same_tensors(rank0, rank1)
        runs[name] = weights(work / "out")
    return runs


@pytest.mark.parametrize("model_name", ["llama", "opt"])
@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_strategies_train_the_same_model(strategy, model_name, ddp_weights, ranks, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{model_name}")
    zero = strategy.startswith("zero")  # its last-step checkpoint must also convert to the same model
    summary = train_with(model, tmp_path / "out", "--strategy", strategy,
                         *(["--save_strategy", "steps", "--save_steps", "16"] if zero else []), launcher=ranks.torchrun)
    assert summary["strategy"] == STRATEGY_NAMES[strategy]
    assert summary["model_wrapper"].startswith(WRAPPERS[strategy])
    assert max_difference(weights(tmp_path / "out"), ddp_weights[model_name]) < 1e-5
    if model_name == "opt":  # tied embeddings are stored once, as by an ordinary save
        assert "lm_head.weight" not in TensorFolder(tmp_path / "out").names()
    if zero:
        check_zero_checkpoint_converts(tmp_path / "out" / "checkpoint-16", tmp_path / "out", tmp_path / "hf",
                                       tied=model_name == "opt", script=(strategy, model_name) == ("zero3", "llama"))


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp", "fsdp_offload"])
def test_bf16_and_gradient_checkpointing(strategy, tiny_llama, ranks, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    summary = train_with(tiny_llama, tmp_path / "out", "--strategy", strategy, "--bf16", "True",
                         "--gradient_checkpointing", "True", script="tests/helpers/train_and_dump.py",
                         launcher=lambda script, *args: ranks.torchrun(script, str(dump), *args),
                         steps=8)  # bf16 steps are slow on CPUs without native bf16; 8 show the loss falling
    family = strategy.removesuffix("_offload")
    assert summary["strategy"] == STRATEGY_NAMES[family] and summary["model_wrapper"].startswith(WRAPPERS[family])
    assert read_probes(dump) == [{"gradient_checkpointing": True, "forward_dtype": "bfloat16"}] * 2


def test_alpaca_fsdp_command(tiny_llama, tmp_path):
    flags = ALPACA_FLAGS + ["--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"]
    result = torchrun("train.py", *tiny_run_flags(tiny_llama, tmp_path / "out"), *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "--evaluation_strategy is --eval_strategy" in result.stderr and "--tf32 ignored" in result.stderr
    summary = check_model_folder(tmp_path / "out", tiny_llama, world_size=2)
    assert summary["strategy"] == "fsdp" and summary["model_wrapper"].startswith("FSDP")


def test_zero3_without_gathered_save_is_consolidated(ddp_weights, tiny_llama, ranks, tmp_path):
    """Alpaca's own offload config does not gather weights on save; the output is a full folder all the same."""
    config = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    (tmp_path / "z3.json").write_text(json.dumps(config))
    summary = train_with(tiny_llama, tmp_path / "out", "--deepspeed", str(tmp_path / "z3.json"), launcher=ranks.torchrun)
    assert summary["strategy"] == "deepspeed-zero3"
    assert not list((tmp_path / "out").glob("global_step*")) and not (tmp_path / "out" / "latest").exists()
    assert max_difference(weights(tmp_path / "out"), ddp_weights["llama"]) < 1e-5


def deepspeed_launcher(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_command([str(SCRIPTS / "deepspeed"), "--num_gpus", "2", "--master_port", str(next(_ports)), script, *args],
                       DS_ACCELERATOR="cpu")


def test_deepspeed_launcher(ddp_weights, tiny_llama, tmp_path):
    summary = train_with(tiny_llama, tmp_path / "out", "--strategy", "zero3", launcher=deepspeed_launcher)
    assert summary["strategy"] == "deepspeed-zero3"
    assert max_difference(weights(tmp_path / "out"), ddp_weights["llama"]) < 1e-5


def test_two_nodes_on_loopback(ddp_weights, tiny_llama, tmp_path):
    """scripts/launch_torchrun.sh started on 2 'nodes' (1 process each), rendezvous on 127.0.0.1."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(next(_ports)),
                   "NNODES": "2", "NPROC_PER_NODE": "1", "PYTHON": PYTHON}
    nodes = [
        subprocess.Popen(["bash", "scripts/launch_torchrun.sh", *equivalence_flags(tiny_llama, tmp_path / "out")],
                         cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    summary = check_model_folder(tmp_path / "out", tiny_llama, world_size=2, loss_drop=0.2)
    assert summary["strategy"] == "ddp"
    assert max_difference(weights(tmp_path / "out"), ddp_weights["llama"]) < 1e-5


def test_padding_free_under_fsdp_trains_the_ddp_model(ddp_weights, tiny_llama, ranks, tmp_path):
    """The same batches flattened: equal to padded DDP up to AdamW's amplified round-off (see test_batching)."""
    summary = train_with(tiny_llama, tmp_path / "out", "--strategy", "fsdp", "--padding_free", "True", launcher=ranks.torchrun)
    assert summary["strategy"] == "fsdp" and summary["speed"]["padding_fraction"] == 0.0
    assert max_difference(weights(tmp_path / "out"), ddp_weights["llama"]) < 1e-3


def test_packing_under_zero3_with_a_family_that_needs_the_mask(tiny_opt, ranks, tmp_path):
    """OPT builds its mask without the position ids: the block-diagonal mask is given to it, through ZeRO-3."""
    result = ranks.torchrun("train.py", *equivalence_flags(tiny_opt, tmp_path / "out"), "--strategy", "zero3",
                      "--packing", "True", "--model_max_length", "512", "--per_device_train_batch_size", "4")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "giving it the block-diagonal mask" in result.stderr
    summary = check_model_folder(tmp_path / "out", tiny_opt, world_size=2, loss_drop=0.2)
    assert summary["strategy"] == "deepspeed-zero3" and 0 < summary["data"]["packed_rows"] < summary["data"]["kept"] / 2
