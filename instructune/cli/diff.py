"""`instructune diff make|recover|verify` and weight_diff.py (Stanford Alpaca's make_diff / recover)."""

import argparse

HELP = "make, recover or verify a weight diff (Alpaca's weight_diff.py)"


def flag_bool(value: str) -> bool:
    """Fire-style booleans, as Alpaca's weight_diff.py takes them: --flag, --flag True, --flag False."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def parser() -> argparse.ArgumentParser:
    from instructune.checkpoint import diff
    from instructune.checkpoint.tensorio import DTYPES

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
    make.add_argument("--exact", type=flag_bool, nargs="?", const=True, default=False,
                      help="lossless diff (XOR of bit patterns): the recovered model is bitwise the tuned one")
    make.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                      help="dtype of a float diff (fp32, Alpaca's; bf16/fp16 halve the size and lose precision)")
    make.add_argument("--max_shard_size", default="2GB")
    make.add_argument("--device", default="cpu", help="where to compute (cpu, cuda)")
    for name, help in (("recover", "rebuild TUNED = RAW + DIFF"), ("verify", "check RAW and DIFF, write nothing")):
        command = commands.add_parser(name, help=help)
        command.add_argument("--path_raw", required=True, help="the base model folder")
        command.add_argument("--path_diff", required=True, help="the diff folder")
        command.add_argument("--device", default="cpu", help="where to compute (cpu, cuda)")
        command.add_argument("--expected_sum", type=float, help="naive check: the expected sum of all recovered weights")
        command.add_argument("--check_integrity_naively", type=flag_bool, nargs="?", const=True, default=False,
                             help=f"Alpaca's check: the sum of all weights must be --expected_sum (default {diff.ALPACA_7B_SUM}, Alpaca 7B's)")
        if name == "recover":
            command.add_argument("--path_tuned", help="the folder to create; without it, only check")
            command.add_argument("--test_inference", type=flag_bool, nargs="?", const=True, default=False,
                                 help="generate an answer with the recovered model (on the GPU when there is one)")
    return parser


def main(argv: list[str]) -> int:
    from instructune.checkpoint import diff

    args = parser().parse_args(argv)
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
    if getattr(args, "test_inference", False) and path_tuned:
        from instructune.inference.answers import answer
        from instructune.inference.engine import load

        engine = load(path_tuned)
        instruction = "List three technologies that make life easier."
        print(f"Q: {instruction}\nA: {answer(engine, instruction)}")
    return 0
