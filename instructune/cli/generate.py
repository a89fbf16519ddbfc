"""`instructune generate`: answer instructions with a model folder or adapter (on the GPU in bf16 when there is one):
one (streamed to the terminal), interactively, or a whole file of them in batches (JSONL in, JSONL out)."""

import argparse
import sys
from pathlib import Path

HELP = "answer instructions with a model: one, interactively, or a JSONL file of them"


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=128,
                        help="at most this many new tokens, and never past the model's context")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, deterministic")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", default=[], help="end the answer before this text (repeatable)")


def sampling_of(args):
    from instructune.inference.engine import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, tuple(args.stop))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="instructune generate", description="Answer instructions with a model, using the prompt template it "
        "was trained with (read from its folder; Alpaca's otherwise).")
    parser.add_argument("--model", "--model_name_or_path", dest="model", required=True, help="model folder, adapter folder, hub id or built-in name")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder to merge into the model")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--instruction", help="answer this instruction; the answer streams to the terminal")
    what.add_argument("--interactive", action="store_true", help="read instructions from the terminal, one per line")
    what.add_argument("--input_file", help="a JSON/JSONL prompt set (Alpaca, Self-Instruct, Vicuna, Koala, WizardLM)")
    parser.add_argument("--input", default="", help="optional context for --instruction (Alpaca's input)")
    parser.add_argument("--output_file", help="with --input_file: the answers, one JSON line each "
                        "({instruction, input, output}); written whole or not at all")
    parser.add_argument("--batch_size", type=int, default=8, help="with --input_file: prompts generated together")
    parser.add_argument("--prompt_template", default="auto", choices=("auto", "alpaca", "chat"),
                        help="auto: the one the model was trained with (its train_results.json), else alpaca")
    add_sampling_flags(parser)
    args = parser.parse_args(argv)
    if args.input_file and not args.output_file:
        parser.error("--input_file needs --output_file")

    from instructune.data.prompts import read_prompts
    from instructune.errors import UserError
    from instructune.inference.answers import answer, answer_file
    from instructune.inference.engine import load

    prompts = read_prompts(args.input_file) if args.input_file else None  # bad input fails before the model loads
    engine = load(args.model, args.adapter, args.prompt_template)
    sampling = sampling_of(args)
    if prompts is not None:
        answer_file(engine, prompts, sampling, args.batch_size, Path(args.output_file))
    elif args.interactive:
        print("instruction (an empty line or Ctrl-D ends):", file=sys.stderr)
        for line in sys.stdin:
            if not line.strip():
                break
            try:
                answer(engine, line.strip(), sampling=sampling, on_text=Printer())
                print(flush=True)
            except UserError as e:  # a prompt too long for the model: say so and take the next one
                print(f"error: {e}", file=sys.stderr)
    else:
        answer(engine, args.instruction, args.input, sampling, on_text=Printer())
        print(flush=True)
    return 0


class Printer:
    """Streams an answer to stdout as it comes, without its leading white space (answer() strips it too)."""

    def __init__(self):
        self.started = False

    def __call__(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        print(piece, end="", flush=True)
