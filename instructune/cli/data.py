"""`instructune data inspect`: formats, sources, duplicates and token lengths of instruction data."""

import argparse
from pathlib import Path

HELP = "inspect instruction data: formats, duplicates, token lengths for a tokenizer, rendered examples"


def main(argv: list[str]) -> int:
    from instructune.data import TEMPLATES
    from instructune.data.inspect import format_summary, inspect, write_report
    from instructune.data.sources import parse_datasets
    from instructune.models import load_tokenizer, resolve_model_path

    parser = argparse.ArgumentParser(prog="instructune data", description=HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("inspect", help="statistics of one or more datasets, mixed as training would mix them")
    command.add_argument("datasets", nargs="+", help="files, folders or hub ids, each optionally PATH:all|COUNT|PERCENT%%")
    command.add_argument("--tokenizer", default="smollm2-135m", help="the tokenizer to count with (default: the built-in model's)")
    command.add_argument("--prompt_template", default="alpaca", choices=TEMPLATES)
    command.add_argument("--model_max_length", type=int, default=512)
    command.add_argument("--output_dir", type=Path, help="write summary.json and lengths.png here")
    command.add_argument("--show", type=int, default=3, help="how many rendered examples to print (learned span in ⟦ ⟧)")
    command.add_argument("--seed", type=int, default=42, help="the sampling seed of PATH:COUNT entries")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(resolve_model_path(args.tokenizer))
    summary, shown, lengths = inspect(parse_datasets(",".join(args.datasets)), tokenizer, args.prompt_template,
                                      args.model_max_length, args.seed, args.show)
    print(format_summary(summary))
    for i, text in enumerate(shown):
        print(f"\n--- example {i} ---\n{text}")
    if args.output_dir:
        write_report(summary, lengths, args.output_dir)
        print(f"\nwritten: {args.output_dir / 'summary.json'}, {args.output_dir / 'lengths.png'}")
    return 0
