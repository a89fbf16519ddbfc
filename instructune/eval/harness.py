"""Leaderboard-style evaluation with EleutherAI's lm-eval harness, in-process on our own model objects (so an adapter,
a merged model or the model being trained is evaluated as it is), and the callback that runs it during training.

lm-eval's task names are the Open LLM Leaderboard's (arc_challenge 25-shot, hellaswag 10-shot, mmlu 5-shot,
truthfulqa_mc2 0-shot, winogrande 5-shot, gsm8k 5-shot); their datasets come from the Hugging Face hub. A task of
your own is a YAML file in --include_path (`dataset_path: json` with `data_files` reads a local JSONL).
"""

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from instructune.errors import UserError

logger = logging.getLogger("instructune")


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's task index (with the YAMLs in include_path), once every task is known to be in it. Tasks that are
    all in include_path are indexed from it alone: lm-eval's own index of some 15,000 tasks takes 8-16 s to build."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (a task of your own: a YAML file in --include_path)"
        raise UserError(f"unknown lm-eval task {', '.join(unknown)}: not in lm-eval{where}")
    return manager


def evaluate(model, tokenizer, tasks: list[str], manager, num_fewshot: int | None = None, limit: float | None = None,
             batch_size: int = 8, seed: int = 1234) -> dict:
    """lm-eval's result dictionary (results, samples, configs, n-shot, versions) for these tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    try:
        return simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=tasks,
                               num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=True,
                               random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                               fewshot_random_seed=seed)
    except (ConnectionError, OSError) as e:  # the hub is unreachable (offline machines) or a data file is missing
        raise UserError(f"--tasks {','.join(tasks)}: a task's dataset cannot be loaded: {e}".splitlines()[0]) from None
    finally:
        model.train(was_training)


def metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} without lm-eval's filter suffix (`acc,none` → `acc`) and its aliases."""
    table = {}
    for task, values in results["results"].items():
        table[task] = {name.split(",")[0]: value for name, value in values.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "alias"}
    return table


def write_results(results: dict, output_dir: Path) -> Path:
    """results.json (lm-eval's results, configs and versions; per-sample records in samples_<task>.jsonl) and
    results.md (lm-eval's table)."""
    from lm_eval.utils import make_table

    output_dir.mkdir(parents=True, exist_ok=True)
    for task, samples in results.get("samples", {}).items():
        with open(output_dir / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, default=str) + "\n")
    kept = {key: results[key] for key in ("results", "groups", "configs", "versions", "n-shot", "higher_is_better",
                                          "n-samples", "config") if key in results}
    (output_dir / "results.json").write_text(json.dumps(kept, indent=2, default=str) + "\n")
    (output_dir / "results.md").write_text(make_table(results) + "\n")
    return output_dir / "results.json"


class LmEvalCallback(TrainerCallback):
    """--eval_tasks during training: every --eval_tasks_steps optimizer steps (and after the last), the main process
    runs the tasks on the model as it is and logs `lm_eval/<task>/<metric>`. The other processes go on to the next
    step and wait there for it (DDP, ZeRO-1/2: every process holds the whole model)."""

    def __init__(self, tasks: list[str], every: int, num_fewshot: int | None, limit: float | None,
                 include_path: str | None):
        self.tasks, self.every, self.num_fewshot, self.limit = tasks, every, num_fewshot, limit
        self.manager = task_manager(tasks, include_path)  # an unknown task fails before training starts

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        last = state.global_step >= state.max_steps
        if not state.is_world_process_zero or not (last or (self.every and state.global_step % self.every == 0)):
            return
        results = evaluate(model, processing_class, self.tasks, self.manager, self.num_fewshot, self.limit,
                           batch_size=args.per_device_eval_batch_size, seed=args.seed)
        entry = {"step": state.global_step}
        for task, values in metrics(results).items():
            entry.update({f"lm_eval/{task}/{name}": value for name, value in values.items()})
        state.log_history.append(entry)
        logger.info("lm-eval at step %d: %s", state.global_step,
                    ", ".join(f"{k.removeprefix('lm_eval/')} {v:.4f}" for k, v in entry.items() if k != "step"))
