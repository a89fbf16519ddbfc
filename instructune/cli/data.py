"""`instructune data inspect` (formats, sources, duplicates, token lengths) and `instructune data filter` (keep the
records a judge model rates highly, as AlpaGasus did)."""

import argparse
import os
from pathlib import Path

HELP = "inspect instruction data, or filter it with a judge model (AlpaGasus)"


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
    judge = commands.add_parser("filter", help="rate every record 0-5 with a judge model (OpenAI-compatible "
                                "chat-completions endpoint) and keep those at or above --threshold")
    judge.add_argument("datasets", nargs="+", help="files, folders or hub ids, each optionally PATH:all|COUNT|PERCENT%%")
    judge.add_argument("--output", type=Path, required=True, help="the kept records (JSON); beside it .summary.json, "
                       ".scores.jsonl and .scores.png")
    judge.add_argument("--judge_url", required=True, help="the API base, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    judge.add_argument("--judge_model", required=True)
    judge.add_argument("--threshold", type=float, default=4.5, help="keep records rated at least this (AlpaGasus: 4.5)")
    judge.add_argument("--api_key_env", default="OPENAI_API_KEY", help="the environment variable holding the API key")
    judge.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    judge.add_argument("--retries", type=int, default=5, help="retries on 429, 5xx, timeouts (exponential backoff)")
    judge.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    judge.add_argument("--cache", type=Path, help="scores already paid for (default: OUTPUT.cache.jsonl); a run "
                       "that was interrupted continues from it")
    judge.add_argument("--seed", type=int, default=42, help="the sampling seed of PATH:COUNT entries")
    args = parser.parse_args(argv)
    if args.command == "filter":
        return run_filter(args)

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


def run_filter(args) -> int:
    from instructune.data.judge import rate, write_filtered
    from instructune.data.sources import load_mix, parse_datasets
    from instructune.inference.client import ChatClient

    conversations = load_mix(parse_datasets(",".join(args.datasets)), seed=args.seed).conversations
    client = ChatClient(args.judge_url, args.judge_model, os.environ.get(args.api_key_env), args.concurrency,
                        args.retries, args.timeout, cache=args.cache or args.output.with_suffix(".cache.jsonl"))
    summary = write_filtered(conversations, rate(conversations, client), args.threshold, args.output)
    print(f"{args.output}: kept {summary['kept']} of {summary['records']} records (score ≥ {args.threshold:g}), "
          f"dropped {summary['dropped']}, failed {summary['failed']}")
    if summary["failed"]:
        reasons = ", ".join(f"{n} {reason}" for reason, n in summary["failures"].items())
        print(f"failed, neither kept nor cached ({reasons}): run the same command again to retry only those")
    return 0
