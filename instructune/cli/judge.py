"""`instructune judge`: compare two models' answers on instruction test sets with a judge model, AlpaGasus-style (both
orders, win/tie/lose per test set, a bar chart)."""

import argparse
from pathlib import Path

from instructune.cli import add_client_flags, client_from_flags

HELP = "compare two models' answers with a judge model, in both orders (AlpaGasus): win/tie/lose and a plot"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="instructune judge", description="Answer each test set with model A and model B (or read their answers), "
        "have a judge model score every pair in both orders, and count A's wins, ties and losses.")
    parser.add_argument("--test_set", nargs="+", required=True, help="prompt sets: Vicuna, Koala, WizardLM, "
                        "Self-Instruct or Alpaca-shaped JSON/JSONL files (named by file: vicuna_test_set.jsonl → vicuna)")
    parser.add_argument("--model_a", help="model A: a model folder, adapter or built-in name whose answers are generated")
    parser.add_argument("--model_b", help="model B, likewise")
    parser.add_argument("--answers_a", nargs="+", help="instead of --model_a: A's answers, Alpaca-shaped lines "
                        "(instruction, input, output), matched to the test sets by instruction and input")
    parser.add_argument("--answers_b", nargs="+", help="instead of --model_b: B's answers")
    parser.add_argument("--name_a", help="how A is called in the report (default: its folder or file name)")
    parser.add_argument("--name_b")
    parser.add_argument("--judge_url", required=True, help="the judge's API base, e.g. https://api.openai.com/v1")
    parser.add_argument("--judge_model", required=True, help="e.g. gpt-4")
    parser.add_argument("--output_dir", type=Path, required=True, help="judgement.json, judgement.png, the answers "
                        "generated (answers_a.jsonl, answers_b.jsonl) and the judge's replies (judge_cache.jsonl: a run "
                        "that was interrupted continues from it)")
    add_client_flags(parser, "judge requests", timeout=120.0)
    parser.add_argument("--max_new_tokens", type=int, default=512, help="the models' answers: at most this many tokens")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts the models answer together")
    args = parser.parse_args(argv)
    for side in ("a", "b"):
        if bool(getattr(args, f"model_{side}")) == bool(getattr(args, f"answers_{side}")):
            parser.error(f"give either --model_{side} or --answers_{side}")
    client = client_from_flags(args, args.judge_url, args.judge_model, args.output_dir / "judge_cache.jsonl",
                               params={"temperature": 0.0, "max_tokens": 512})

    from instructune.data.prompts import read_answers, read_prompts
    from instructune.errors import DataError
    from instructune.eval.pairwise import Pair, judge, write_report

    test_sets = {Path(path).stem.removesuffix("_test_set"): read_prompts(path) for path in args.test_set}
    if len(test_sets) < len(args.test_set):
        raise DataError("--test_set: two files have the same name; each test set is reported by its file name")
    prompts = [prompt for prompts in test_sets.values() for prompt in prompts]
    answers, names = {}, {}
    for side in ("a", "b"):  # read both sides' given answers before generating any
        if files := getattr(args, f"answers_{side}"):
            answers[side] = {key: text for file in files for key, text in read_answers(file).items()}
            missing = next((p for p in prompts if p.key not in answers[side]), None)
            if missing:
                raise DataError(f"--answers_{side}: no answer to {missing.instruction[:60]!r}"
                                f"{' (input ' + repr(missing.input[:30]) + ')' if missing.input else ''}")
            names[side] = getattr(args, f"name_{side}") or Path(files[0]).stem
    for side in ("a", "b"):
        if side not in answers:
            answers[side], generated_name = generate(getattr(args, f"model_{side}"), prompts, args,
                                                     args.output_dir / f"answers_{side}.jsonl")
            names[side] = getattr(args, f"name_{side}") or generated_name
    if names["a"] == names["b"]:
        names = {"a": f"{names['a']} (A)", "b": f"{names['b']} (B)"}

    pairs = [Pair(name, p, answers["a"][p.key], answers["b"][p.key]) for name, ps in test_sets.items() for p in ps]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = write_report(judge(pairs, client), (names["a"], names["b"]), args.judge_model, args.output_dir)
    print(f"{names['a']} vs {names['b']}, judged by {args.judge_model} in both orders:")
    for name, counts in report["counts"].items():
        failed = f"  (failed: {counts['failed']})" if counts["failed"] else ""
        print(f"  {name:12s} win {counts['win']:4d}  tie {counts['tie']:4d}  lose {counts['lose']:4d}{failed}")
    print(f"written: {args.output_dir / 'judgement.json'}, {args.output_dir / 'judgement.png'}")
    if report["counts"]["overall"]["failed"]:
        print("failed pairs have no verdict and their failed replies were not cached: run the same command again to "
              "retry only those")
    return 0


def generate(model: str, prompts, args, output: Path):
    """Answers by (instruction, input), written to `output` as well (reusable as --answers_a/b), and the model's name."""
    import gc

    from instructune.inference.answers import answer_file
    from instructune.inference.engine import Sampling, load

    engine = load(model)
    answered = answer_file(engine, prompts, Sampling(max_new_tokens=args.max_new_tokens), args.batch_size, output)
    name = engine.name
    del engine
    gc.collect()  # one model in memory at a time
    return {prompt.key: text for prompt, text in answered}, name
