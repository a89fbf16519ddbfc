"""`instructune generate`: answer an instruction with a model folder (on the GPU in bf16 when there is one)."""

import argparse

HELP = "answer an instruction with a model folder"


def main(argv: list[str]) -> int:
    from instructune.data import TEMPLATES
    from instructune.generate import answer, load_for_generation

    parser = argparse.ArgumentParser(prog="instructune generate", description="Answer an instruction with a model.")
    parser.add_argument("--model_name_or_path", required=True, help="model folder, hub id or built-in name")
    parser.add_argument("--instruction", required=True)
    parser.add_argument("--input", default="", help="optional context for the instruction")
    parser.add_argument("--prompt_template", default="alpaca", choices=TEMPLATES)
    parser.add_argument("--max_new_tokens", type=int, default=128,
                        help="at most this many new tokens, and never past the model's maximum length")
    args = parser.parse_args(argv)
    model, tokenizer = load_for_generation(args.model_name_or_path)
    print(answer(model, tokenizer, args.instruction, args.input, args.prompt_template, args.max_new_tokens))
    return 0
