"""`instructune demo`: fine-tune the built-in model on the sample data for a few minutes, with evidence.

The evidence is measured, not anecdotal: records held out from training (the demo config's
val_set_size) are scored before and after, and their loss must fall; two answers are shown beside it.
"""

HELP = "a short CPU fine-tune of the built-in SmolLM2-135M on the sample data: held-out loss and answers, before/after"

DEMO_CONFIG = "configs/smollm2-135m-cpu.yaml"
DEMO_QUESTIONS = [
    ("What is the capital of Spain?", ""),
    ("Sort the following numbers in ascending order.", "42, 7, 19, 3"),
]


def main(argv: list[str]) -> int:
    from instructune.config import parse_train_args
    from instructune.data.prompts import Prompt
    from instructune.inference.answers import answer_all
    from instructune.inference.engine import Sampling, load
    from instructune.training import recipe

    if "--config" not in argv:
        argv = ["--config", DEMO_CONFIG, *argv]
    model_args, data_args, training_args = parse_train_args(argv)

    def show(title: str, model_path: str) -> None:
        engine = load(model_path, template=data_args.prompt_template)
        print(f"\n=== {title} ({model_path})")
        questions = [Prompt(instruction, input) for instruction, input in DEMO_QUESTIONS]
        for question, reply in answer_all(engine, questions, Sampling(max_new_tokens=48)):  # one batch
            print(f"Q: {f'{question.instruction} {question.input}'.strip()}\nA: {reply}\n")

    show("before fine-tuning", model_args.model_name_or_path)
    outcome = recipe.train(model_args, data_args, training_args)
    show("after fine-tuning", training_args.output_dir)

    quarter = max(1, len(outcome.losses) // 4)
    first, last = outcome.losses[:quarter], outcome.losses[-quarter:]
    print(f"training loss, mean of the first and last {quarter} steps: "
          f"{sum(first) / quarter:.3f} → {sum(last) / quarter:.3f} ({len(outcome.losses)} steps)")
    if outcome.heldout_losses:
        before, after = outcome.heldout_losses[0], outcome.heldout_losses[-1]
        print(f"held-out loss ({outcome.data.heldout} records never trained on): {before:.3f} → {after:.3f} "
              f"({'fell' if after < before else 'did not fall'})")
    print(f"the fine-tuned model is a Hugging Face folder: {training_args.output_dir}")
    return 0
