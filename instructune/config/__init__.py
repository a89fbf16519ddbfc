"""Config stage: what a training run is (three dataclasses) and how a command line becomes one."""

from instructune.config.args import DataArguments, ModelArguments, TrainingArguments
from instructune.config.argv import RESOURCES, STRATEGIES, expand_argv, shipped
from instructune.errors import ConfigError

__all__ = ["DataArguments", "ModelArguments", "TrainingArguments", "RESOURCES", "STRATEGIES", "parse_train_args",
           "shipped"]


def parse_train_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """(ModelArguments, DataArguments, TrainingArguments) from a training command line."""
    from transformers import HfArgumentParser

    from instructune import distributed

    argv = distributed.adjust_flags_for_device(expand_argv(argv))
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # unknown flags, and TrainingArguments' own checks
        raise ConfigError(str(e).splitlines()[0]) from None
    data_args.data_path = shipped(data_args.data_path)
    distributed.adjust_args_for_device(training_args)
    return model_args, data_args, training_args


def train_parser_help(prog: str) -> str:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog=prog)
    return parser.format_help() + (
        "\n  --config FILE         YAML file of the flags above (flags given after it override it)"
        f"\n  --strategy NAME       one of {', '.join(STRATEGIES)} (ds_configs/), or auto (the planner's choice)\n"
    )
