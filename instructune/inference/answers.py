"""Answers to many prompts at once (`generate --input_file`, `judge`, the demo, `diff`'s check): every request through
the continuous scheduler, at most `batch_size` in flight, in the prompts' order; static batches of `batch_size` for a
model the scheduler cannot serve."""

import json
import logging
from pathlib import Path
from typing import Callable

from instructune.data.formats import Message
from instructune.files import atomic_file
from instructune.inference.continuous import Scheduler, unsupported_reason
from instructune.inference.engine import Completion, Engine, Request, Sampling

logger = logging.getLogger("instructune")


def generate_all(engine: Engine, requests: list[Request], max_rows: int,
                 on_done: Callable[[int], None] | None = None) -> list[Completion]:
    """Each request's completion, in their order; `on_done(n)` as n more end (a progress bar)."""
    reason = unsupported_reason(engine)
    if reason:
        logger.info("static batches of %d: continuous batching cannot serve this model (%s)", max_rows, reason)
        completions = []
        for start in range(0, len(requests), max_rows):
            completions += engine.generate(requests[start:start + max_rows])
            if on_done:
                on_done(len(completions) - start)
        return completions
    scheduler = Scheduler(engine, max_rows)
    for request in requests:
        scheduler.add(request)
    done = {}
    while scheduler.busy:
        ended = scheduler.step()
        for request, outcome in ended:
            if isinstance(outcome, Exception):
                raise outcome
            done[id(request)] = outcome
        if ended and on_done:
            on_done(len(ended))
    return [done[id(request)] for request in requests]


def answer_all(engine: Engine, prompts: list, sampling: Sampling, batch_size: int = 8) -> list[tuple]:
    """(prompt, answer) for prompts with `instruction` and `input` (data.prompts.Prompt), in order, with a progress
    bar."""
    from tqdm.auto import tqdm

    requests = [Request(engine.prompt_ids([Message("user", p.instruction, p.input)]), sampling) for p in prompts]
    with tqdm(total=len(prompts), desc="answering", unit="prompt") as bar:
        completions = generate_all(engine, requests, batch_size, bar.update)
    return [(prompt, completion.text.strip()) for prompt, completion in zip(prompts, completions)]


def answer_file(engine: Engine, prompts: list, sampling: Sampling, batch_size: int, output: Path) -> list[tuple]:
    """Answers as {instruction, input, output, generator} lines (what the judge reads), written whole or not at all;
    returns the (prompt, answer) pairs written."""
    answered = answer_all(engine, prompts, sampling, batch_size)
    with atomic_file(output) as f:
        for prompt, text in answered:
            f.write(json.dumps({"instruction": prompt.instruction, "input": prompt.input, "output": text,
                                "generator": engine.name}) + "\n")
    logger.info("%d answers written to %s", len(prompts), output)
    return answered


def answer(engine: Engine, instruction: str, input: str = "", sampling: Sampling | None = None,
           on_text: Callable[[str], None] | None = None) -> str:
    """The answer to one instruction (greedy unless told), without the prompt and special tokens."""
    request = Request(engine.prompt_ids([Message("user", instruction, input)]), sampling or Sampling(), on_text)
    return engine.generate([request])[0].text.strip()
