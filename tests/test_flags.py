"""One typed path from the command line to the run (#21 §1): YAML keys, their command-line overrides and Alpaca's
transformers-4 names reach the same typed fields, parsed once; --strategy auto plans from those typed values, so a
bare flag or a legacy name is planned as the trainer will run it (seen: a bare --gradient_checkpointing, a bare
--load_in_4bit and --per_gpu_train_batch_size were planned as if absent)."""

import pytest

from instructune.config import parse_train_args
from instructune.training import plan as planner
from instructune.training.plan import GIB, Hardware, Workload

from conftest import SAMPLE_DATA


def parse(tmp_path, *flags, **kwargs):
    return parse_train_args(["--model_name_or_path", "llama-2-7b", "--data_path", str(SAMPLE_DATA), "--output_dir",
                             str(tmp_path / "out"), "--report_to", "none", *flags], **kwargs)


def test_yaml_its_override_and_legacy_names_reach_the_same_typed_fields(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.001\nper_gpu_train_batch_size: 3\nwarmup_ratio: 0.03\nmodel_max_length: 256\n")
    _, _, from_yaml = parse(tmp_path, "--config", str(config))
    assert (from_yaml.learning_rate, from_yaml.per_device_train_batch_size, from_yaml.model_max_length) == (1e-3, 3, 256)
    assert from_yaml.warmup_steps == 0.03 and from_yaml.config == str(config)
    _, _, overridden = parse(tmp_path, "--config", str(config), "--learning_rate", "2e-5", "--per_device_train_batch_size", "5")
    assert (overridden.learning_rate, overridden.per_device_train_batch_size) == (2e-5, 5)
    model_args, _, legacy = parse(tmp_path, "--per_gpu_train_batch_size", "7", "--evaluation_strategy", "no",
                                  "--gradient_checkpointing", "--model", "llama-2-13b")
    assert legacy.per_device_train_batch_size == 7 and legacy.eval_strategy == "no" and legacy.gradient_checkpointing
    assert model_args.model_name_or_path == "llama-2-13b"  # --model, as every other command names it


@pytest.mark.parametrize("flags, expected", [
    (["--gradient_checkpointing"], Workload(512, 8, gradient_checkpointing=True)),
    (["--lora_r", "8", "--load_in_4bit"], Workload(512, 8, lora_r=8, load_in_4bit=True)),
    (["--per_gpu_train_batch_size", "2", "--model_max_length", "1024"], Workload(1024, 2)),
    (["--config", "CONFIG", "--gradient_checkpointing", "False"], Workload(256, 3)),
])
def test_strategy_auto_plans_the_workload_the_trainer_will_run(tmp_path, monkeypatch, flags, expected):
    config = tmp_path / "run.yaml"
    config.write_text("per_gpu_train_batch_size: 3\nmodel_max_length: 256\ngradient_checkpointing: true\n")
    flags = [str(config) if flag == "CONFIG" else flag for flag in flags]
    seen = []

    def choose(model_args, training_args):
        seen.append(Workload.from_args(model_args, training_args))
        return "ddp"

    _, _, training_args = parse(tmp_path, "--strategy", "auto", *flags, choose_strategy=choose)
    assert seen == [expected]
    assert (training_args.model_max_length, training_args.per_device_train_batch_size,
            training_args.gradient_checkpointing) == (expected.seq_len, expected.micro_batch, expected.gradient_checkpointing)


def test_strategy_auto_applies_the_planners_choice_to_the_typed_arguments(tmp_path, monkeypatch):
    """Llama-2-7B on 8 × 24 GB: FSDP fits only with gradient checkpointing, given here as a bare flag."""
    monkeypatch.setattr(planner, "detect_hardware", lambda: Hardware(gpus=8, gpu_mem=24 * GIB))
    _, _, training_args = parse(tmp_path, "--strategy", "auto", "--per_device_train_batch_size", "4",
                                "--gradient_checkpointing", choose_strategy=planner.auto_strategy)
    assert training_args.fsdp and not training_args.deepspeed  # FSDP, as the plan chose


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_is_bf16_where_the_cpu_computes_in_it(native, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("instructune.config.device.cpu_has_bf16", lambda: native)
    config = tmp_path / "run.yaml"
    config.write_text("bf16: auto\n")
    with caplog.at_level("INFO", logger="instructune"):
        _, _, args = parse(tmp_path, "--config", str(config))
    assert args.bf16 is native and args.mixed_precision == ("bf16" if native else "no")
    assert ("training in bf16 autocast" if native else "no native bf16 on this machine") in caplog.text
