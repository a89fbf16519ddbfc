"""`instructune train` and train.py: Stanford Alpaca's flags, or a YAML file with `--config`."""

import logging
import os
import sys

HELP = "fine-tune a causal LM on instruction data (Alpaca's train.py flags, or --config FILE)"

logger = logging.getLogger("instructune")


def main(argv: list[str], callbacks=None) -> int:
    from instructune.config.device import on_cpu

    if on_cpu():  # the process's setting, before DeepSpeed is first imported: it would probe for CUDA first
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's CPU communication op is compiled on first use (30-40 s) into a cache that torch shares between
        # environments, and rebuilt whenever another environment used it last: a virtual environment keeps its own
        # (scripts/setup.sh builds it there).
        if sys.prefix != sys.base_prefix:
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

    from instructune.config import parse_train_args, train_parser_help
    from instructune.training import guard, plan, recipe

    if argv and argv[0] in ("-h", "--help"):
        print(train_parser_help("instructune train"))
        return 0
    model_args, data_args, training_args = parse_train_args(argv, choose_strategy=plan.auto_strategy)
    outcome = recipe.train(model_args, data_args, training_args, callbacks=callbacks)
    if outcome.preempted_at is not None:
        return guard.PREEMPTED
    if outcome.losses:
        logger.info("loss %.4f → %.4f; model saved in %s", outcome.losses[0], outcome.losses[-1], training_args.output_dir)
    return 0
