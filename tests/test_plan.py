"""The memory planner: parameter counts from a meta-device model equal the published ones, model-state figures equal
DeepSpeed's own estimators given the same counts, the JSON plan has its fields, the choice is the fastest option that
fits, and `--strategy auto` picks and says why. (Predicted vs measured peaks: bench/plan.py.)"""

import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from instructune.cli import main
from instructune.errors import ConfigError
from instructune.training import plan as planner
from instructune.training.plan import GIB, Hardware, Workload, choose, plan, shape_of

from conftest import SAMPLE_DATA

# Meta's published parameter counts of Llama 2
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192}


@pytest.fixture(scope="module")
def shapes():
    return {name: shape_of(name) for name in PUBLISHED}


def test_parameter_counts_of_the_shipped_configs_are_the_published_ones(shapes):
    assert {name: s.params for name, s in shapes.items()} == PUBLISHED
    assert shapes["llama-2-7b"].largest_layer == 32000 * 4096  # the embedding (and the untied LM head)
    assert shapes["llama-2-70b"].kv_hidden == 8 * 128  # grouped-query attention


@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (8, 2), (4, 16)])
def test_model_states_equal_deepspeeds_estimators(shapes, gpus, nodes):
    for shape in shapes.values():
        options = {o.strategy: o for o in plan(shape, Hardware(gpus, nodes), Workload())}
        for offload in (False, True):
            cpu, gpu = estimate_zero2_model_states_mem_needs(shape.params, gpus, nodes, cpu_offload=offload)
            assert options["zero2_offload" if offload else "zero2"].gpu_model_states_bytes == gpu
            cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, gpus, nodes,
                                                                 cpu_offload=offload, cpu_offload_params=offload)
            assert options["zero3_offload" if offload else "zero3"].gpu_model_states_bytes == gpu3
            if offload:  # what the node holds for the offloaded states is DeepSpeed's CPU figure
                assert planner.deepspeed_zero2(shape.params, gpus, nodes, True)[0] == cpu
                assert planner.deepspeed_zero3(shape.params, shape.largest_layer, gpus, nodes, True)[0] == cpu3


def test_the_choice_is_the_fastest_that_fits_and_the_figures_move_the_right_way(shapes):
    seven = shapes["llama-2-7b"]
    alpaca = plan(seven, Hardware(gpus=4, gpu_mem=80 * GIB), Workload(seq_len=512, micro_batch=4))
    by_name = {o.strategy: o for o in alpaca}
    assert not by_name["ddp"].fits and by_name["fsdp"].fits  # Alpaca's 7B recipe: FSDP on 4 × 80 GB
    assert choose(alpaca, Workload()).strategy == "zero2"  # the fastest that fits: DDP does not, ZeRO-2 comes next
    assert by_name["qlora"].gpu_model_states_bytes < by_name["lora"].gpu_model_states_bytes < by_name["ddp"].gpu_model_states_bytes

    small = plan(seven, Hardware(gpus=8, gpu_mem=24 * GIB), Workload(micro_batch=1))
    checkpointed = plan(seven, Hardware(gpus=8, gpu_mem=24 * GIB), Workload(micro_batch=1, gradient_checkpointing=True))
    assert all(c.gpu_activations_bytes < s.gpu_activations_bytes for s, c in zip(small, checkpointed))
    doubled = plan(seven, Hardware(gpus=8, gpu_mem=24 * GIB), Workload(micro_batch=2))
    assert doubled[0].gpu_activations_bytes == 2 * small[0].gpu_activations_bytes  # linear in tokens on a GPU
    more_gpus = plan(seven, Hardware(gpus=16, gpu_mem=24 * GIB), Workload(micro_batch=1))
    assert more_gpus[3].strategy == "zero3" and more_gpus[3].gpu_model_states_bytes < small[3].gpu_model_states_bytes
    assert choose(plan(shapes["llama-2-70b"], Hardware(gpus=1, gpu_mem=24 * GIB), Workload()), Workload()) is None
    qlora = Workload(micro_batch=1, gradient_checkpointing=True, lora_r=16, load_in_4bit=True)  # QLoRA: 70B on one GPU
    assert choose(plan(shape_of("llama-2-70b", ranks=(16,)), Hardware(gpus=1), qlora), qlora).strategy == "qlora"


def test_plan_command_json_and_table_offline(tiny_llama, capsys):
    assert main(["plan", "--model", "llama-2-13b", "--gpus", "8", "--gpu_mem", "80", "--json"]) == 0
    options = json.loads(capsys.readouterr().out)
    assert [o["strategy"] for o in options] == list(planner.FULL + planner.ADAPTERS)
    for o in options:
        assert {"strategy", "fits", "gpu_model_states_bytes", "gpu_total_bytes", "cpu_total_bytes", "command"} <= o.keys()
        assert o["gpu_total_bytes"] > o["gpu_model_states_bytes"] and o["cpu_total_bytes"] > 0
    states = {o["strategy"]: o["gpu_model_states_bytes"] for o in options}
    assert all(states[f"{name}_offload"] < states[name] for name in ("zero2", "fsdp", "zero3"))
    # on the GPU, model states of every strategy but FSDP's offload (which moves all of them to the CPU)
    assert [name for name, held in states.items() if held <= 0] == ["fsdp_offload"]
    chosen = [o for o in options if o["chosen"]]
    assert len(chosen) == 1 and chosen[0]["fits"] and "meta-llama/Llama-2-13b-hf" in chosen[0]["command"]
    assert main(["plan", "--model", str(tiny_llama), "--gpus", "2", "--nodes", "2"]) == 0
    table = capsys.readouterr().out
    assert "fastest that fits: ddp" in table and "NNODES=2" in table
    assert main(["plan", "--model", "no/such-model"]) == 2
    missing = capsys.readouterr().err
    assert "nothing is downloaded" in missing and "llama-2-7b" in missing


def auto(*flags: str) -> str:
    """--strategy auto's choice for a command line, as train.py makes it (the planner sees the typed arguments)."""
    from instructune.config import planner_view

    return planner.auto_strategy(*planner_view(list(flags)))


def test_auto_strategy_chooses_for_the_hardware_found(tiny_llama, monkeypatch, caplog):
    flags = ["--model_name_or_path", str(tiny_llama), "--per_device_train_batch_size", "4"]
    monkeypatch.setattr(planner, "detect_hardware", lambda: Hardware(gpus=8, gpu_mem=80 * GIB))
    with caplog.at_level("INFO", logger="instructune"):
        assert auto(*flags) == "ddp"
    assert "--strategy auto: ddp" in caplog.text and "8 GPUs" in caplog.text
    seven = [*flags, "--model_name_or_path", "llama-2-7b"]
    monkeypatch.setattr(planner, "detect_hardware", lambda: Hardware(gpus=4, gpu_mem=80 * GIB))
    assert auto(*seven) == "zero2"
    monkeypatch.setattr(planner, "detect_hardware", lambda: Hardware(gpus=8, gpu_mem=24 * GIB))
    assert auto(*seven, "--gradient_checkpointing", "True") == "fsdp"
    monkeypatch.setattr(planner, "detect_hardware", lambda: Hardware(gpus=1, gpu_mem=24 * GIB, cpu_mem=64 * GIB))
    with pytest.raises(ConfigError, match="no strategy fits meta-llama/Llama-2-7b-hf on 1 GPU"):
        auto(*seven)
    assert auto(*seven, "--lora_r", "8", "--load_in_4bit", "True") == "ddp"  # QLoRA fits


@pytest.mark.slow
def test_train_with_strategy_auto_says_what_it_chose(tiny_llama, tmp_path, caplog):
    with caplog.at_level("INFO", logger="instructune"):
        assert main(["train", "--model_name_or_path", str(tiny_llama), "--data_path", str(SAMPLE_DATA), "--output_dir",
                     str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
                     "--model_max_length", "128", "--save_strategy", "no", "--report_to", "none", "--strategy", "auto"]) == 0
    assert "--strategy auto: ddp (" in caplog.text and "1 CPU process" in caplog.text
    assert json.loads((tmp_path / "out" / "train_results.json").read_text())["strategy"] == "single-process"


def test_dpo_counts_its_reference_and_twice_the_sequences(shapes, capsys):
    shape, hardware = shapes["llama-2-7b"], Hardware(gpus=8)
    P = shape.params
    sft = {o.strategy: o for o in plan(shape, hardware, Workload(micro_batch=2))}
    dpo = {o.strategy: o for o in plan(shape, hardware, Workload(micro_batch=1, method="dpo"))}
    precomputed = {o.strategy: o for o in plan(shape, hardware, Workload(micro_batch=1, method="dpo",
                                                                         precompute_ref_log_probs=True))}
    expected = {"ddp": 4 * P, "zero2": 2 * P, "zero3": 2 * P // 8, "fsdp": 4 * P // 8, "lora": 0, "qlora": 0}
    for strategy, reference in expected.items():
        assert dpo[strategy].gpu_reference_bytes == reference, strategy  # the frozen copy, placed like the policy
        # 1 pair is 2 sequences: the activations of an SFT micro-batch of 2
        assert dpo[strategy].gpu_activations_bytes == sft[strategy].gpu_activations_bytes
        assert dpo[strategy].gpu_total_bytes == sft[strategy].gpu_total_bytes + reference
        assert precomputed[strategy].gpu_total_bytes == sft[strategy].gpu_total_bytes
    assert main(["plan", "--model", "llama-2-7b", "--method", "dpo", "--micro_batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "DPO: 1 pair = 2 sequences per micro-batch" in out and "--method dpo" in out
