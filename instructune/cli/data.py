"""`instructune data inspect` (formats, sources, duplicates, token lengths), `instructune data filter` (keep the
records a rater model scores highly, as AlpaGasus did; `instructune judge` is the pairwise evaluation) and
`instructune data generate` (Self-Instruct, as Alpaca made its 52K)."""

import argparse
import json
from pathlib import Path

from instructune.cli import add_client_flags, client_from_flags

HELP = "inspect instruction data, filter it with a rater model (AlpaGasus), or generate it (Self-Instruct)"


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
    generator = commands.add_parser("generate", help="Self-Instruct: new tasks from a model shown 3 human seed tasks "
                                    "at a time, filtered as Alpaca filtered them (ROUGE-L above 0.7: too similar)")
    generator.add_argument("--seed_tasks", type=Path, required=True, help="Self-Instruct's seed tasks (JSON Lines of "
                           "{instruction, instances: [{input, output}]}), e.g. ../shared/data/seed_tasks.jsonl")
    generator.add_argument("--num_instructions", type=int, required=True, help="tasks to keep")
    generator.add_argument("--output", type=Path, required=True, help="the kept tasks (Alpaca JSON, with each one's "
                           "most similar earlier instruction and its ROUGE-L); beside it .summary.json")
    generator.add_argument("--endpoint", required=True, help="the API base, e.g. https://api.openai.com/v1 or "
                           "http://127.0.0.1:8000/v1 (instructune serve)")
    generator.add_argument("--model", required=True, help="the model the endpoint serves")
    generator.add_argument("--api", default="completions", choices=("completions", "chat"),
                           help="completions (as Alpaca: the model continues the numbered list) or chat-completions")
    generator.add_argument("--prompt_file", type=Path, help="your own prompt template (the seed tasks are appended "
                           "to it, numbered); default: Alpaca's requirements, in this tool's words")
    generator.add_argument("--max_tokens", type=int, default=3072, help="new tokens per request (Alpaca: 3072)")
    generator.add_argument("--temperature", type=float, default=1.0, help="Alpaca: 1.0")
    generator.add_argument("--max_requests", type=int, help="stop after this many requests even if fewer tasks were "
                           "kept (default: 10 + the number of instructions)")
    generator.add_argument("--seed", type=int, default=42, help="draws the seed tasks of each request")
    add_client_flags(generator, "generation requests", timeout=600.0)
    generator.add_argument("--cache", type=Path, help="replies already paid for (default: OUTPUT.cache.jsonl); the "
                           "same command again continues from it without asking again")
    args = parser.parse_args(argv)
    if args.command == "filter":
        return run_filter(args)
    if args.command == "generate":
        return run_generate(args)

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


def run_generate(args) -> int:
    from tqdm.auto import tqdm

    from instructune.cli import check_ranges
    from instructune.data.self_instruct import PROMPT, Reply, generate, read_seeds
    from instructune.errors import UserError
    from instructune.files import atomic_file, refuse_output_over_inputs
    from instructune.inference.client import reply_text

    check_ranges([("--num_instructions", args.num_instructions, 1, 10**8), ("--max_tokens", args.max_tokens, 1, 10**6),
                  ("--max_requests", 1 if args.max_requests is None else args.max_requests, 1, 10**9)])
    cache = args.cache or args.output.with_suffix(".cache.jsonl")
    summary_path = args.output.with_suffix(".summary.json")
    for output in (args.output, summary_path, cache):
        refuse_output_over_inputs(output, {"seed tasks": [str(args.seed_tasks)]}, "--output")
    seeds = read_seeds(args.seed_tasks)
    template = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else PROMPT

    def reply_of(payload: dict) -> str:
        choice = payload["choices"][0]
        return Reply(reply_text(payload), choice.get("finish_reason"),
                     int((payload.get("usage") or {}).get("total_tokens") or 0)).dumps()

    client = client_from_flags(args, args.endpoint, args.model, cache, completions=args.api == "completions",
                               reply_of=reply_of, params={"temperature": args.temperature, "top_p": 1.0,
                                                          "max_tokens": args.max_tokens})
    max_requests = args.max_requests if args.max_requests is not None else 10 + args.num_instructions

    def complete(prompts: list[str]) -> list:
        replies = client.complete_all([[{"role": "user", "content": p}] for p in prompts], desc="requests")
        return [Reply.loads(r) if isinstance(r, str) else r for r in replies]

    with tqdm(total=args.num_instructions, desc="kept", unit="task") as bar:
        def progress(kept: int, asked: int) -> None:
            bar.update(kept - bar.n)
            bar.set_postfix(asked=asked)

        result = generate(seeds, complete, args.num_instructions, template, args.seed, args.concurrency, max_requests,
                          progress)
    if result.counts["requests"] == result.counts["failed requests"]:
        reasons = ", ".join(f"{n} {reason}" for reason, n in result.failures.items())
        raise UserError(f"{args.endpoint}: every one of the {result.counts['requests']} requests failed ({reasons}); "
                        f"nothing written to {args.output}")
    with atomic_file(args.output) as f:
        json.dump(result.records, f, indent=2, ensure_ascii=False)
    summary = {"kept": len(result.records), "asked": args.num_instructions, "tokens_used": result.tokens_used,
               **{k: v for k, v in result.counts.items() if k != "kept"}}
    with atomic_file(summary_path) as f:
        json.dump(summary, f, indent=2)
    dropped = ", ".join(f"{n} {reason}" for reason, n in result.counts.items()
                        if reason not in ("requests", "kept", "failed requests", "replies with no task") and n)
    print(f"{args.output}: kept {len(result.records)} of {args.num_instructions} tasks asked for, from "
          f"{result.counts['requests']} requests ({result.counts['failed requests']} failed, "
          f"{result.counts['replies with no task']} with no task; dropped: {dropped or 'none'}; "
          f"{result.tokens_used:,} tokens)")
    if len(result.records) < args.num_instructions:
        print(f"stopped at --max_requests {max_requests}: run again with a larger one to continue (the replies so far "
              "are cached)")
    return 0
