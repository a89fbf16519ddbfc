"""A training command line → the flags HfArgumentParser reads (parser input), without side effects.

A command line may start from a YAML file (`--config FILE`, its keys are the flag names; flags given
after it override it), may name a strategy (`--strategy zero3` → the ds_configs/ file it stands
for), and may use Stanford Alpaca's flag names from transformers 4, which are mapped to their
transformers 5 names with a one-line notice instead of a parser error.
"""

import json
import logging
from pathlib import Path

import yaml

from instructune.errors import ConfigError

logger = logging.getLogger("instructune")

# The repo's top-level ds_configs/, configs/ and alpaca_data.json, shipped inside the package (as
# symlinks in a checkout, as files in a wheel), so that an installed instructune finds them anywhere.
RESOURCES = Path(__file__).resolve().parents[1] / "resources"

# --strategy NAME → the flags it stands for (the ds_configs/ files say when to pick which)
STRATEGIES = {
    "ddp": [],
    "zero2": ["--deepspeed", "zero2.json"],
    "zero2_offload": ["--deepspeed", "zero2_offload.json"],
    "zero3": ["--deepspeed", "zero3.json"],
    "zero3_offload": ["--deepspeed", "zero3_offload.json"],
    "fsdp": ["--fsdp", "full_shard auto_wrap", "--fsdp_config", "fsdp_full_shard.json"],
    "fsdp_offload": ["--fsdp", "full_shard auto_wrap offload", "--fsdp_config", "fsdp_full_shard_offload.json"],
}
STRATEGY_FLAGS = ("--deepspeed", "--fsdp", "--fsdp_config", "--fsdp_transformer_layer_cls_to_wrap")

# transformers 4 flag → transformers 5 flag (same value)
RENAMED_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",
    "--warmup_ratio": "--warmup_steps",  # in transformers 5 a warmup_steps below 1 is a ratio
    "--per_gpu_train_batch_size": "--per_device_train_batch_size",
    "--per_gpu_eval_batch_size": "--per_device_eval_batch_size",
    "--no_cuda": "--use_cpu",
}
# the names every instructune command takes (train's own name for the model is Alpaca's --model_name_or_path)
ALIASES = {"--model": "--model_name_or_path"}
# transformers 4 flags with no transformers 5 counterpart (their behaviour is now the default)
REMOVED_FLAGS = ("--save_safetensors", "--logging_dir", "--use_ipex", "--include_tokens_per_second")


def shipped(path: str) -> str:
    """`path` as given if it exists; else the packaged copy of a shipped file (configs/x.yaml,
    ds_configs/x.json, alpaca_data.json) if there is one, so commands work outside a checkout."""
    if Path(path).exists() or Path(path).is_absolute() or not (RESOURCES / path).exists():
        return path
    return str(RESOURCES / path)


def strategy_flags(name: str) -> list[str]:
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy {name}: unknown; choose one of {', '.join(STRATEGIES)}, or auto")
    return [str(RESOURCES / "ds_configs" / v) if v.endswith(".json") else v for v in STRATEGIES[name]]


def _split_flags(argv: list[str]) -> list[tuple[str, list[str]]]:
    """[(flag, values)] in order; '--flag=value' is split; a leading value-less token is an error."""
    items: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            items.append((flag, [value] if eq else []))
        elif items:
            items[-1][1].append(token)
        else:
            raise ConfigError(f"unexpected argument {token!r}: flags look like --name value")
    return items


def _join_flags(items: list[tuple[str, list[str]]]) -> list[str]:
    return [token for flag, values in items for token in (flag, *values)]


def expand_config_file(argv: list[str]) -> list[str]:
    """Replace `--config FILE` with the file's settings as flags, before the remaining flags."""
    items = _split_flags(argv)
    config_files = [values for flag, values in items if flag == "--config"]
    if not config_files:
        return argv
    if len(config_files) > 1 or len(config_files[0]) != 1:
        raise ConfigError("--config takes exactly one YAML file")
    path = Path(shipped(config_files[0][0]))
    try:
        settings = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: a config file is a mapping of flag names to values")
    from_file = []
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)) and key != "report_to":
            values = [json.dumps(value)]
        elif isinstance(value, list):
            values = [str(v) for v in value]
        else:
            values = [str(value)]
        from_file.append((f"--{key}", values))
    # --config stays, as the file's path: the run keeps its output folder off it
    return _join_flags(from_file) + _join_flags([(f, v) if f != "--config" else (f, [str(path)]) for f, v in items])


def chosen_strategy(argv: list[str]) -> str | None:
    """The name the last --strategy gives (auto included), or None."""
    names = [values for flag, values in _split_flags(argv) if flag == "--strategy"]
    if names and len(names[-1]) != 1:
        raise ConfigError("--strategy takes one name")
    return names[-1][0] if names else None


def expand_strategy(argv: list[str], auto: str | None = None) -> list[str]:
    """`--strategy NAME` → the DeepSpeed or FSDP flags of ds_configs/ it stands for; `--strategy auto` → those of
    `auto`, the planner's choice.

    Like any flag, the later of `--strategy` and explicit --deepspeed/--fsdp flags wins, so a
    --strategy on the command line overrides the FSDP settings of a YAML config, and vice versa.
    """
    name = chosen_strategy(argv)
    if name is None:
        return argv
    if name == "auto":
        if auto is None:
            raise ConfigError("--strategy auto: no strategy was chosen for it")
        name = auto
    items = _split_flags(argv)
    position = max(i for i, (flag, _) in enumerate(items) if flag == "--strategy")
    explicit = [i for i, (flag, _) in enumerate(items) if flag in STRATEGY_FLAGS]
    if explicit and explicit[-1] > position:
        logger.info("--%s given after --strategy %s: using it instead", items[explicit[-1]][0].lstrip("-"), name)
        return _join_flags([item for item in items if item[0] != "--strategy"])
    if explicit:
        logger.info("--strategy %s replaces the earlier %s", name, ", ".join(sorted({items[i][0] for i in explicit})))
    rest = [item for item in items if item[0] != "--strategy" and item[0] not in STRATEGY_FLAGS]
    return _join_flags(rest) + strategy_flags(name)


def translate_legacy_flags(argv: list[str]) -> list[str]:
    """Map Alpaca-era (transformers 4) flags to transformers 5, saying so once per flag."""
    items, layer_classes = [], []
    for flag, values in _split_flags(argv):
        if flag in ALIASES:
            items.append((ALIASES[flag], values))
        elif flag in RENAMED_FLAGS:
            logger.info("%s is %s in transformers 5: using that", flag, RENAMED_FLAGS[flag])
            items.append((RENAMED_FLAGS[flag], values))
        elif flag in REMOVED_FLAGS:
            logger.info("%s was removed in transformers 5: ignored", flag)
        elif flag == "--group_by_length":
            logger.info("--group_by_length is --train_sampling_strategy group_by_length in transformers 5: using that")
            if not values or values[0].lower() in ("true", "1", "yes"):
                items.append(("--train_sampling_strategy", ["group_by_length"]))
        elif flag == "--fsdp_transformer_layer_cls_to_wrap":
            layer_classes += [name for value in values for name in value.split(",")]
        else:
            items.append((flag, values))
    if layer_classes:
        logger.info("--fsdp_transformer_layer_cls_to_wrap moved into --fsdp_config in transformers 5: using that")
        fsdp_config = {}
        for flag, values in items:
            if flag == "--fsdp_config":
                fsdp_config = _load_json_or_file(values[0])
        fsdp_config["transformer_layer_cls_to_wrap"] = layer_classes
        items = [(f, v) for f, v in items if f != "--fsdp_config"]
        items.append(("--fsdp_config", [json.dumps(fsdp_config)]))
    return _join_flags(items)


def _load_json_or_file(value: str) -> dict:
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--fsdp_config: not a JSON object or a JSON file: {e.msg}") from None
