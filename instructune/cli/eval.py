"""`instructune eval`: lm-eval harness tasks (the Open LLM Leaderboard's, or your own YAMLs) on a model folder or
adapter, in-process, with a results JSON and a table."""

import argparse
from pathlib import Path

HELP = "run lm-eval tasks (ARC, HellaSwag, MMLU, ... or your own) on a model: results.json and a table"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="instructune eval", description="Evaluate a model with EleutherAI's lm-eval harness, in-process. The "
        "Open LLM Leaderboard: arc_challenge (25-shot), hellaswag (10), mmlu (5), truthfulqa_mc2 (0), winogrande (5), "
        "gsm8k (5); their datasets come from the Hugging Face hub.")
    parser.add_argument("--model", "--model_name_or_path", dest="model", required=True, help="model folder, adapter folder, hub id or built-in name")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder to merge into the model")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_challenge,hellaswag")
    parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    parser.add_argument("--limit", type=float, default=None, help="at most this many examples per task (a fraction "
                        "below 1); for quick checks, not for reported figures")
    parser.add_argument("--include_path", default=None, help="a folder of task YAMLs of your own (e.g. `dataset_path: "
                        "json` with `data_files` for local JSONL)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1234, help="few-shot sampling and any sampled generation")
    parser.add_argument("--output_dir", type=Path, required=True,
                        help="where results.json, results.md and samples_<task>.jsonl go")
    args = parser.parse_args(argv)

    from lm_eval.utils import make_table

    from instructune.eval.harness import evaluate, task_manager, write_results
    from instructune.inference.engine import load

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = task_manager(tasks, args.include_path)  # an unknown task fails before the model loads
    engine = load(args.model, args.adapter)
    results = evaluate(engine.model, engine.tokenizer, tasks, manager, args.num_fewshot, args.limit, args.batch_size,
                       args.seed)
    print(make_table(results))
    print(f"written: {write_results(results, args.output_dir)}")
    return 0
