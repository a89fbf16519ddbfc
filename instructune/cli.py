"""Command lines → a run config, and the `instructune` subcommands.

A training command line may start from a YAML file (`--config FILE`, its keys are the flag names;
flags given after it override it) and may use Stanford Alpaca's flag names from transformers 4,
which are mapped to their transformers 5 names with a one-line notice instead of a parser error.
"""

import argparse
import functools
import json
import logging
import sys
from pathlib import Path

import yaml

from instructune import distributed
from instructune.errors import ConfigError, UserError

logger = logging.getLogger("instructune")

# transformers 4 flag → transformers 5 flag (same value)
RENAMED_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",
    "--warmup_ratio": "--warmup_steps",  # in transformers 5 a warmup_steps below 1 is a ratio
    "--per_gpu_train_batch_size": "--per_device_train_batch_size",
    "--per_gpu_eval_batch_size": "--per_device_eval_batch_size",
    "--no_cuda": "--use_cpu",
}
# transformers 4 flags with no transformers 5 counterpart (their behaviour is now the default)
REMOVED_FLAGS = (
    "--overwrite_output_dir",
    "--save_safetensors",
    "--logging_dir",
    "--use_ipex",
    "--include_tokens_per_second",
)


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


STRATEGY_FLAGS = ("--deepspeed", "--fsdp", "--fsdp_config", "--fsdp_transformer_layer_cls_to_wrap")


def expand_strategy(argv: list[str]) -> list[str]:
    """`--strategy NAME` → the DeepSpeed or FSDP flags of ds_configs/ it stands for.

    Like any flag, the later of `--strategy` and explicit --deepspeed/--fsdp flags wins, so a
    --strategy on the command line overrides the FSDP settings of a YAML config, and vice versa.
    """
    items = _split_flags(argv)
    positions = [i for i, (flag, _) in enumerate(items) if flag == "--strategy"]
    if not positions:
        return argv
    if len(items[positions[-1]][1]) != 1:
        raise ConfigError("--strategy takes one name")
    name = items[positions[-1]][1][0]
    explicit = [i for i, (flag, _) in enumerate(items) if flag in STRATEGY_FLAGS]
    if explicit and explicit[-1] > positions[-1]:
        logger.info("--%s given after --strategy %s: using it instead", items[explicit[-1]][0].lstrip("-"), name)
        return _join_flags([item for item in items if item[0] != "--strategy"])
    if explicit:
        logger.info("--strategy %s replaces the earlier %s", name, ", ".join(sorted({items[i][0] for i in explicit})))
    rest = [item for item in items if item[0] != "--strategy" and item[0] not in STRATEGY_FLAGS]
    return _join_flags(rest) + distributed.strategy_flags(name)


def translate_legacy_flags(argv: list[str]) -> list[str]:
    """Map Alpaca-era (transformers 4) flags to transformers 5, saying so once per flag."""
    items, layer_classes = [], []
    for flag, values in _split_flags(argv):
        if flag in RENAMED_FLAGS:
            logger.info("%s is %s in transformers 5: using that", flag, RENAMED_FLAGS[flag])
            items.append((RENAMED_FLAGS[flag], values))
        elif flag in REMOVED_FLAGS:
            logger.info("%s was removed in transformers 5: ignored", flag)
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


def expand_config_file(argv: list[str]) -> list[str]:
    """Replace `--config FILE` with the file's settings as flags, before the remaining flags."""
    items = _split_flags(argv)
    config_files = [values for flag, values in items if flag == "--config"]
    if not config_files:
        return argv
    if len(config_files) > 1 or len(config_files[0]) != 1:
        raise ConfigError("--config takes exactly one YAML file")
    path = Path(config_files[0][0])
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
    return _join_flags(from_file) + _join_flags([(f, v) for f, v in items if f != "--config"])


def parse_train_args(argv: list[str]):
    """(ModelArguments, DataArguments, TrainingArguments) from a training command line."""
    from transformers import HfArgumentParser

    from instructune.config import DataArguments, ModelArguments, TrainingArguments

    argv = expand_config_file(argv)
    argv = expand_strategy(argv)
    argv = translate_legacy_flags(argv)
    argv = distributed.adjust_flags_for_device(argv)
    distributed.init_process_group_early(uses_deepspeed="--deepspeed" in argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # unknown flags, and TrainingArguments' own checks
        raise ConfigError(str(e).splitlines()[0]) from None
    distributed.adjust_args_for_device(training_args)
    return model_args, data_args, training_args


def _setup_logging() -> None:
    logging.basicConfig(format="instructune: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO if distributed.main_process() else logging.WARNING)


def run_training(argv: list[str], callbacks=None) -> int:
    """The `train` command (and train.py): returns the exit code; distributed runs end the process."""
    from instructune import recipe

    _setup_logging()
    if argv and argv[0] in ("-h", "--help"):
        from transformers import HfArgumentParser

        from instructune.config import DataArguments, ModelArguments, TrainingArguments

        HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog="instructune train").print_help()
        print("\n  --config FILE         YAML file of the flags above (flags given after it override it)")
        print(f"  --strategy NAME       one of {', '.join(distributed.STRATEGIES)} (ds_configs/)")
        return 0
    try:
        model_args, data_args, training_args = parse_train_args(argv)
        outcome = recipe.train(model_args, data_args, training_args, callbacks=callbacks)
        if outcome.losses:
            logger.info("loss %.4f → %.4f; model saved in %s", outcome.losses[0], outcome.losses[-1], training_args.output_dir)
        code = 0
    except UserError as e:
        if distributed.main_process():
            print(f"error: {e}", file=sys.stderr)
        code = 2
    if distributed.is_initialized():
        distributed.exit_process(code)
    return code


DEMO_QUESTIONS = [
    ("What is the capital of Spain?", ""),
    ("Sort the following numbers in ascending order.", "42, 7, 19, 3"),
]


def run_demo(argv: list[str]) -> int:
    """Fine-tune the built-in model on the sample data for a few minutes and show answers before and after."""
    from instructune import recipe
    from instructune.generate import answer, load_for_generation

    _setup_logging()
    if "--config" not in argv:
        argv = ["--config", "configs/smollm2-135m-cpu.yaml", *argv]
    try:
        model_args, data_args, training_args = parse_train_args(argv)

        def show(title: str, model_path: str) -> None:
            model, tokenizer = load_for_generation(model_path)
            print(f"\n=== {title} ({model_path})")
            for instruction, input in DEMO_QUESTIONS:
                question = f"{instruction} {input}".strip()
                reply = answer(model, tokenizer, instruction, input, data_args.prompt_template, max_new_tokens=48)
                print(f"Q: {question}\nA: {reply}\n")

        show("before fine-tuning", model_args.model_name_or_path)
        outcome = recipe.train(model_args, data_args, training_args)
        show("after fine-tuning", training_args.output_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quarter = max(1, len(outcome.losses) // 4)
    first, last = outcome.losses[:quarter], outcome.losses[-quarter:]
    print(
        f"training loss, mean of the first and last {quarter} steps: "
        f"{sum(first) / quarter:.3f} → {sum(last) / quarter:.3f} ({len(outcome.losses)} steps)"
    )
    print(f"the fine-tuned model is a Hugging Face folder: {training_args.output_dir}")
    return 0


def run_generate(argv: list[str]) -> int:
    from instructune.data import TEMPLATES
    from instructune.generate import answer, load_for_generation

    parser = argparse.ArgumentParser(prog="instructune generate", description="Answer an instruction with a model.")
    parser.add_argument("--model_name_or_path", required=True, help="model folder, hub id or built-in name")
    parser.add_argument("--instruction", required=True)
    parser.add_argument("--input", default="", help="optional context for the instruction")
    parser.add_argument("--prompt_template", default="alpaca", choices=TEMPLATES)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        model, tokenizer = load_for_generation(args.model_name_or_path)
    except (UserError, OSError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    print(answer(model, tokenizer, args.instruction, args.input, args.prompt_template, args.max_new_tokens))
    return 0


def _flag_bool(value: str) -> bool:
    """Fire-style booleans, as Alpaca's weight_diff.py takes them: --flag, --flag True, --flag False."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def run_diff(argv: list[str]) -> int:
    """`instructune diff make|recover|verify` and weight_diff.py (Alpaca's make_diff / recover)."""
    from instructune import diff

    parser = argparse.ArgumentParser(
        prog="instructune diff",
        description="Publish a fine-tuned model as a weight diff against its base, and recover it. Streams tensor "
        "by tensor; a manifest of SHA-256 checksums refuses a wrong base and names a damaged shard.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", aliases=["make_diff"], help="write DIFF = TUNED - RAW")
    make.add_argument("--path_raw", required=True, help="the base model folder")
    make.add_argument("--path_tuned", required=True, help="the fine-tuned model folder")
    make.add_argument("--path_diff", required=True, help="the diff folder to create")
    make.add_argument("--exact", type=_flag_bool, nargs="?", const=True, default=False,
                      help="lossless diff (XOR of bit patterns): the recovered model is bitwise the tuned one")
    make.add_argument("--dtype", choices=sorted(diff.DIFF_DTYPES), default="fp32",
                      help="dtype of a float diff (fp32, Alpaca's; bf16/fp16 halve the size and lose precision)")
    make.add_argument("--max_shard_size", default="2GB")
    make.add_argument("--device", default="cpu", help="where to compute (cpu, cuda)")
    for name, help in (("recover", "rebuild TUNED = RAW + DIFF"), ("verify", "check RAW and DIFF, write nothing")):
        command = commands.add_parser(name, help=help)
        command.add_argument("--path_raw", required=True, help="the base model folder")
        command.add_argument("--path_diff", required=True, help="the diff folder")
        command.add_argument("--device", default="cpu", help="where to compute (cpu, cuda)")
        command.add_argument("--expected_sum", type=float, help="naive check: the expected sum of all recovered weights")
        command.add_argument("--check_integrity_naively", type=_flag_bool, nargs="?", const=True, default=False,
                             help=f"Alpaca's check: the sum of all weights must be --expected_sum (default {diff.ALPACA_7B_SUM}, Alpaca 7B's)")
        if name == "recover":
            command.add_argument("--path_tuned", help="the folder to create; without it, only check")
            command.add_argument("--test_inference", type=_flag_bool, nargs="?", const=True, default=False,
                                 help="generate an answer with the recovered model")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        if args.command in ("make", "make_diff"):
            report = diff.make_diff(args.path_raw, args.path_tuned, args.path_diff, args.exact, args.dtype,
                                    args.max_shard_size, args.device)
            print(f"diff written to {args.path_diff}: {report.summary()}")
            return 0
        expected = args.expected_sum
        if args.check_integrity_naively and expected is None:
            expected = diff.ALPACA_7B_SUM
        path_tuned = getattr(args, "path_tuned", None)
        report = diff.recover(args.path_raw, args.path_diff, path_tuned, args.device, expected)
        print(f"{'recovered into ' + path_tuned if path_tuned else 'checked'}: {report.summary()}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "test_inference", False) and path_tuned:
        from instructune.generate import answer, load_for_generation

        model, tokenizer = load_for_generation(path_tuned)
        instruction = "List three technologies that make life easier."
        print(f"Q: {instruction}\nA: {answer(model, tokenizer, instruction)}")
    return 0


def weight_diff_main() -> None:
    """weight_diff.py: Alpaca's `make_diff` / `recover` command line."""
    sys.exit(run_diff(sys.argv[1:]))


def run_convert(command: str, argv: list[str]) -> int:
    """`instructune convert` (DeepSpeed/FSDP checkpoint → HF folder) and `instructune shard` (re-shard a folder)."""
    from instructune.checkpoint.convert import convert_checkpoint
    from instructune.checkpoint.shard import DTYPES, reshard

    descriptions = {
        "convert": "A DeepSpeed ZeRO-2/3 checkpoint (checkpoint-N/ with global_stepN/, or a folder with latest) or "
        "an FSDP sharded checkpoint (pytorch_model_fsdp_0/) → a complete Hugging Face folder.",
        "shard": "Re-shard a Hugging Face model folder (single or sharded, safetensors or .bin), tensor by tensor.",
    }
    parser = argparse.ArgumentParser(
        prog=f"instructune {command}", description=descriptions[command] + " The output appears only when complete."
    )
    parser.add_argument("source", help="checkpoint folder" if command == "convert" else "model folder")
    parser.add_argument("destination", help="the Hugging Face folder to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the floating-point weights"
                        + (" (default fp32)" if command == "convert" else " (default: as they are)"))
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        if command == "convert":
            count = convert_checkpoint(args.source, args.destination, args.dtype or "fp32", args.max_shard_size)
        else:
            count = reshard(args.source, args.destination, args.max_shard_size, args.dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.destination}: {count} tensors")
    return 0


COMMANDS = {
    "train": (run_training, "fine-tune a causal LM on instruction data (Alpaca's train.py flags, or --config FILE)"),
    "demo": (run_demo, "a short CPU fine-tune of the built-in SmolLM2-135M on the sample data, answers before/after"),
    "generate": (run_generate, "answer an instruction with a model folder"),
    "diff": (run_diff, "make, recover or verify a weight diff (Alpaca's weight_diff.py)"),
    "convert": (functools.partial(run_convert, "convert"), "a DeepSpeed ZeRO or FSDP sharded checkpoint → a HF folder"),
    "shard": (functools.partial(run_convert, "shard"), "re-shard a HF folder (size, dtype), tensor by tensor"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: instructune COMMAND [flags]   (instructune COMMAND --help for its flags)\n\ncommands:")
        for name, (_, help) in COMMANDS.items():
            print(f"  {name:10s} {help}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]][0](argv[1:])


def train_main() -> None:
    """train.py: Alpaca's entry point, flags only."""
    sys.exit(run_training(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
