"""Config stage: what a training run is (three dataclasses) and how a command line becomes one, parsed once.

The command line becomes parser input in one place (argv.py: a YAML file, Alpaca's transformers-4 names, a named
strategy; device.py: the CPU's adjustments), and HfArgumentParser turns it into the dataclasses once.
`--strategy auto` is resolved before that parse by the caller's planner, from typed values of the same flags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from instructune.config.argv import (
    RESOURCES,
    STRATEGIES,
    chosen_strategy,
    expand_config_file,
    expand_strategy,
    shipped,
    translate_legacy_flags,
)
from instructune.config.device import adjust_for_device, device_flags
from instructune.errors import ConfigError

if TYPE_CHECKING:
    from instructune.config.args import DataArguments, ModelArguments, TrainingArguments

__all__ = ["DataArguments", "ModelArguments", "TrainingArguments", "RESOURCES", "STRATEGIES", "parse_train_args",
           "planner_view", "shipped"]


def __getattr__(name: str):
    """The three dataclasses, imported when first asked for: they import transformers' Trainer stack (peft,
    bitsandbytes: ~5 s), which commands that only read config.device (serve, generate, --help) never need."""
    if name in ("DataArguments", "ModelArguments", "TrainingArguments"):
        from instructune.config import args

        return getattr(args, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# What --strategy auto's planner reads of the training arguments, with TrainingArguments' own defaults and types.
PLANNED_TRAINING_FIELDS = ("model_max_length", "per_device_train_batch_size", "gradient_checkpointing")


def parse_train_args(argv: list[str], choose_strategy: Callable | None = None
                     ) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """(ModelArguments, DataArguments, TrainingArguments) from a training command line.

    `choose_strategy(model_args, training_view) -> name` resolves `--strategy auto` (the planner, which config does
    not import: training's); it sees the typed values the run will use, bare flags and legacy names included."""
    from transformers import HfArgumentParser

    from instructune.config.args import DataArguments, ModelArguments, TrainingArguments

    flags = translate_legacy_flags(expand_config_file(argv))
    if chosen_strategy(flags) == "auto":
        if choose_strategy is None:
            raise ConfigError("--strategy auto is chosen by `instructune train` (train.py): name a strategy here")
        flags = expand_strategy(flags, choose_strategy(*planner_view(flags)))
    flags = device_flags(expand_strategy(flags))
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=flags)
    except ValueError as e:  # unknown flags, and TrainingArguments' own checks
        raise ConfigError(str(e).splitlines()[0]) from None
    data_args.data_path = shipped(data_args.data_path)
    adjust_for_device(training_args)
    return model_args, data_args, training_args


def planner_view(flags: list[str]):
    """(ModelArguments, the training fields the planner reads) parsed from parser input, typed as the run will have
    them, without building TrainingArguments (which sets up devices and process groups)."""
    import dataclasses

    from transformers import HfArgumentParser

    from instructune.config.args import DataArguments, ModelArguments, TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    view = dataclasses.make_dataclass("PlannedTraining", [
        (name, fields[name].type, dataclasses.field(default=fields[name].default, metadata=fields[name].metadata))
        for name in PLANNED_TRAINING_FIELDS])
    model_args, _, training = HfArgumentParser((ModelArguments, DataArguments, view)).parse_args_into_dataclasses(
        args=flags, return_remaining_strings=True)[:3]
    return model_args, training


def train_parser_help(prog: str) -> str:
    from transformers import HfArgumentParser

    from instructune.config.args import DataArguments, ModelArguments, TrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog=prog)
    return parser.format_help() + (
        "\n  --config FILE         YAML file of the flags above (flags given after it override it)"
        f"\n  --strategy NAME       one of {', '.join(STRATEGIES)} (ds_configs/), or auto (the planner's choice)\n"
    )
