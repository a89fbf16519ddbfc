"""`instructune data inspect` (formats, sources, duplicates, token lengths) and `instructune data filter` (keep the
records a rater model scores highly, as AlpaGasus did; `instructune judge` is the pairwise evaluation)."""

import argparse
from pathlib import Path

from instructune.cli import add_client_flags, client_from_flags

HELP = "inspect instruction data, or filter it with a rater model (AlpaGasus)"


def main(argv: list[str]) -> int:
    from instructune.data import TEMPLATES
    from instructune.data.inspect import format_summary, inspect, write_report
    from instructune.data.sources import parse_datasets
    from instructune.modeling.models import add_missing_special_tokens, load_tokenizer, resolve_model_path

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
    command.add_argument("--pad_token", default="[PAD]", help="as for training: added when the tokenizer has none "
                         "(the cache entry is the training run's only with the same tokenizer)")
    command.add_argument("--tokenized_cache_dir", help="the training run's cache, read (or written) here: a run with "
                         "the same data and settings then finds its data prepared")
    command.add_argument("--preprocessing_num_workers", type=int, help="processes that tokenise, if not cached yet")
    rater = commands.add_parser("filter", help="rate every record 0-5 with a rater model (OpenAI-compatible "
                                "chat-completions endpoint) and keep those at or above --threshold")
    rater.add_argument("datasets", nargs="+", help="files, folders or hub ids, each optionally PATH:all|COUNT|PERCENT%%")
    rater.add_argument("--output", type=Path, required=True, help="the kept records (JSON); beside it .summary.json, "
                       ".scores.jsonl and .scores.png")
    rater.add_argument("--rater_url", "--judge_url", dest="rater_url", required=True,
                       help="the rater's API base, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    rater.add_argument("--rater_model", "--judge_model", dest="rater_model", required=True, help="e.g. gpt-4")
    rater.add_argument("--threshold", type=float, default=4.5, help="keep records rated at least this (AlpaGasus: 4.5)")
    add_client_flags(rater, "rating requests", timeout=60.0)
    rater.add_argument("--cache", type=Path, help="scores already paid for (default: OUTPUT.cache.jsonl); a run "
                       "that was interrupted continues from it")
    rater.add_argument("--seed", type=int, default=42, help="the sampling seed of PATH:COUNT entries")
    args = parser.parse_args(argv)
    if args.command == "filter":
        return run_filter(args)

    tokenizer = load_tokenizer(resolve_model_path(args.tokenizer))
    add_missing_special_tokens(tokenizer, args.pad_token)
    summary, shown, lengths = inspect(parse_datasets(",".join(args.datasets)), tokenizer, args.prompt_template,
                                      args.model_max_length, args.seed, args.show, args.tokenized_cache_dir,
                                      args.preprocessing_num_workers)
    print(format_summary(summary))
    for i, text in enumerate(shown):
        print(f"\n--- example {i} ---\n{text}")
    if args.output_dir:
        write_report(summary, lengths, args.output_dir)
        print(f"\nwritten: {args.output_dir / 'summary.json'}, {args.output_dir / 'lengths.png'}")
    return 0


def run_filter(args) -> int:
    from instructune.data.rater import rate, write_filtered
    from instructune.data.sources import load_mix, parse_datasets
    from instructune.errors import UserError
    from instructune.files import refuse_output_over_inputs

    specs = parse_datasets(",".join(args.datasets))
    cache = args.cache or args.output.with_suffix(".cache.jsonl")
    written = [args.output, *(args.output.with_suffix(s) for s in (".summary.json", ".scores.jsonl", ".scores.png")), cache]
    for output in written:
        refuse_output_over_inputs(output, {"input data": [spec.path for spec in specs]}, "--output")
    conversations = load_mix(specs, seed=args.seed).conversations
    client = client_from_flags(args, args.rater_url, args.rater_model, cache)
    verdicts = rate(conversations, client)
    if all(score is None for score in verdicts.scores):
        reasons = ", ".join(f"{n} {reason}" for reason, n in verdicts.failures.items())
        raise UserError(f"{args.rater_url}: every one of the {len(conversations)} rating requests failed ({reasons}); "
                        f"nothing written to {args.output}")
    summary = write_filtered(conversations, verdicts, args.threshold, args.output)
    print(f"{args.output}: kept {summary['kept']} of {summary['records']} records (score ≥ {args.threshold:g}), "
          f"dropped {summary['dropped']}, failed {summary['failed']}")
    if summary["failed"]:
        reasons = ", ".join(f"{n} {reason}" for reason, n in summary["failures"].items())
        print(f"failed, neither kept nor cached ({reasons}): run the same command again to retry only those")
    return 0
