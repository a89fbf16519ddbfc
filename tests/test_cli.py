"""Command lines: Alpaca's transformers-4 flags are mapped, YAML configs load and CLI flags override them."""

import json
import logging
import pytest

from instructune.cli import main
from instructune.config import parse_train_args
from instructune.config.argv import expand_config_file, translate_legacy_flags
from instructune.errors import ConfigError

from conftest import REPO, SAMPLE_DATA


def test_alpaca_flags_are_mapped_to_transformers_5(caplog):
    caplog.set_level(logging.INFO, logger="instructune")
    argv = translate_legacy_flags(
        ["--evaluation_strategy", "no", "--warmup_ratio=0.03", "--fsdp", "full_shard auto_wrap",
         "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--overwrite_output_dir", "--logging_dir", "logs",
         "--per_gpu_train_batch_size", "4"]
    )
    assert argv == [  # --overwrite_output_dir keeps its meaning (our own flag); --logging_dir goes
        "--eval_strategy", "no", "--warmup_steps", "0.03", "--fsdp", "full_shard auto_wrap", "--overwrite_output_dir",
        "--per_device_train_batch_size", "4",
        "--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}),
    ]
    notices = caplog.text
    for flag in ("--evaluation_strategy", "--warmup_ratio", "--fsdp_transformer_layer_cls_to_wrap", "--logging_dir"):
        assert flag in notices


def test_layer_class_merges_into_a_given_fsdp_config():
    argv = translate_legacy_flags(
        ["--fsdp_config", '{"activation_checkpointing": true}', "--fsdp_transformer_layer_cls_to_wrap", "OPTDecoderLayer"]
    )
    assert json.loads(argv[argv.index("--fsdp_config") + 1]) == {
        "activation_checkpointing": True, "transformer_layer_cls_to_wrap": ["OPTDecoderLayer"]
    }


def test_alpaca_readme_command_parses_on_the_cpu(tmp_path):
    """Alpaca's README flags (paths and sizes aside) give the intended TrainingArguments, tf32 dropped here."""
    model_args, data_args, args = parse_train_args(
        ["--model_name_or_path", "some/model", "--data_path", "./alpaca_data.json", "--bf16", "True",
         "--output_dir", str(tmp_path), "--num_train_epochs", "3", "--per_device_train_batch_size", "4",
         "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "8", "--evaluation_strategy", "no",
         "--save_strategy", "steps", "--save_steps", "2000", "--save_total_limit", "1", "--learning_rate", "2e-5",
         "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
         "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--tf32", "True"]
    )
    assert model_args.model_name_or_path == "some/model" and data_args.data_path == "./alpaca_data.json"
    assert args.eval_strategy == "no" and args.warmup_steps == 0.03 and args.learning_rate == 2e-5
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.use_cpu and args.bf16 and not args.tf32
    assert args.optim == "adamw_torch_fused" and args.model_max_length == 512  # AdamW (fused) and Alpaca's length


def test_yaml_config_with_cli_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\nlearning_rate: 1.0e-4\nnum_train_epochs: 2\nreport_to: [none]\n"
                      f"output_dir: {tmp_path}\nfsdp_config: {{activation_checkpointing: true}}\n")
    model_args, _, args = parse_train_args(["--config", str(config), "--learning_rate", "2e-4"])
    assert model_args.model_name_or_path == "m"
    assert args.learning_rate == 2e-4 and args.num_train_epochs == 2 and args.report_to == []  # "none"
    assert args.fsdp_config["activation_checkpointing"] is True


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_alpaca_recipes_train_on_the_real_52k_set():
    recipes = [c for c in CONFIGS if "alpaca" in c.name]
    assert len(recipes) == 3
    for config in recipes:
        _, data_args, args = parse_train_args(["--config", str(config)])
        assert data_args.data_path == "tatsu-lab/alpaca" and args.fsdp and args.bf16


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_trains(config, request, ranks, tmp_path):
    """Each recipe as it stands (strategy, precision, schedule, batch, FSDP layer class), on 2 CPU processes; only
    model (a tiny one of the recipe's family), data, output and length are overridden."""
    tiny_model = request.getfixturevalue("tiny_opt" if config.name.startswith("opt") else "tiny_llama")
    result = ranks.torchrun("train.py", "--config", str(config), "--model_name_or_path", str(tiny_model), "--data_path",
                            str(SAMPLE_DATA), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                            "--disable_tqdm", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert summary["world_size"] == 2 and len(summary["losses"]) == 1
    assert summary["strategy"] == ("fsdp" if "alpaca" in config.name else "ddp")


@pytest.mark.parametrize(
    "text, message",
    [("- a\n- b\n", "a mapping of flag names"), ("a: [1\n", "invalid YAML"), ("no_such_flag: 1\n", "no_such_flag")],
)
def test_bad_config_files_are_one_line_errors(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse_train_args(["--config", str(config), "--output_dir", str(tmp_path)])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        expand_config_file(["--config", str(tmp_path / "none.yaml")])


def test_instructune_command_lists_its_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "demo", "generate"))
    assert main(["train", "--help"]) == 0
    assert "--data_path" in capsys.readouterr().out


def test_strategy_on_the_command_line_overrides_the_config_file(tmp_path):
    """The README's multi-node commands: Alpaca's FSDP recipe file, run with --strategy zero3."""
    _, _, args = parse_train_args(["--config", str(REPO / "configs" / "llama2-7b-alpaca.yaml"), "--strategy", "zero3",
                                   "--output_dir", str(tmp_path)])
    assert args.deepspeed.endswith("ds_configs/zero3.json") and not args.fsdp
    _, _, args = parse_train_args(["--strategy", "zero3", "--fsdp", "full_shard auto_wrap", "--output_dir", str(tmp_path)])
    assert args.fsdp and not args.deepspeed  # the later flag wins


def test_unknown_strategy(tmp_path):
    with pytest.raises(ConfigError, match="--strategy zero4: unknown; choose one of ddp, zero2"):
        parse_train_args(["--strategy", "zero4", "--output_dir", str(tmp_path)])
