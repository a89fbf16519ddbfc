"""Self-Instruct as Stanford Alpaca made its 52K (`instructune data generate`): each request shows a model 3 human
seed tasks and asks for more in the same numbered form; the reply is parsed into instruction/input/output tasks,
which pass Alpaca's filters (more than 3 and at most 150 words; none of its words for what a text model cannot do; not
"Write a program..."; not starting with punctuation or a non-ASCII character; the last task dropped when the reply
was cut by its length) and are kept when their ROUGE-L F-measure against every seed and every task kept so far is at
most 0.7 (Alpaca's test: dropped above 0.7). The prompts are drawn from the seeds with the run's seed, request by
request, so a run asked again replays the same requests: the client's cache answers those already paid for.

The ROUGE-L filter makes exactly Alpaca's decision (the `rouge_score` package's tokenizer and LCS, its F-measure)
without comparing every pair: F = 2·LCS/(m+n) for token counts m and n, and the LCS is at most the tokens two texts
share (counted with multiplicity), so an inverted index of the kept tasks' tokens bounds every pair's F at once and
only the pairs whose bound could exceed the best found so far get an LCS (best first: branch and bound). The nearest
kept task and its score are exact too.
"""

import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instructune.errors import DataError

PROMPT = """You are asked to come up with 20 diverse task instructions for a language model, each with an input and
the output the model should give. The tasks will be used to teach a model to follow instructions.

Requirements:
1. Vary the verbs: do not start two instructions the same way.
2. Vary the language: mix questions with imperative instructions.
3. Vary the kind of task: open-ended writing, classification, editing, rewriting, reasoning, brainstorming,
   extraction, question answering and more.
4. Every task must be possible for a text-only model: nothing to see, hear, draw or do in the world (no images, no
   audio, no reminders, no web browsing).
5. Write the instructions in English, each 1 to 2 sentences long: an imperative sentence or a question.
6. Give an input when the task needs one: a specific, realistic example (real content, not a placeholder), at
   most about 100 words. When the task needs no input, write "<noinput>" as its input.
7. The output must be a good answer to the instruction and its input, in fewer than 100 words.

List of 20 tasks:
"""
PROMPT_TASKS = 3  # human seed tasks shown in each request
THRESHOLD = 0.7  # ROUGE-L F above this against any seed or kept task: too similar
# Alpaca's words for tasks a text model cannot do (matched as whole words, any case)
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
BLACKLISTED = re.compile(r"\b(" + "|".join(map(re.escape, BLACKLIST)) + r")\b", re.IGNORECASE)


@dataclass(frozen=True)
class Task:
    instruction: str
    input: str
    output: str


def read_seeds(path: Path) -> list[Task]:
    """Self-Instruct's seed tasks (JSON Lines of {instruction, instances: [{input, output}]}: the first instance)."""
    from instructune.data.sources import read_json_records

    seeds = []
    for where, record in read_json_records(Path(path)):
        instances = record.get("instances") if isinstance(record, dict) else None
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
        fields = (record.get("instruction"), instances[0].get("input", ""), instances[0].get("output"))
        for name, value in zip(("instruction", "instances[0].input", "instances[0].output"), fields):
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{name}' must be a string")
        if not fields[0].strip() or not fields[2].strip():
            raise DataError(f"{where}: field '{'instruction' if not fields[0].strip() else 'instances[0].output'}' "
                            "is empty")
        seeds.append(Task(*fields))
    if len(seeds) < PROMPT_TASKS:
        raise DataError(f"{path}: {len(seeds)} seed tasks; each request shows {PROMPT_TASKS}")
    return seeds


def encode_prompt(template: str, tasks: list[Task]) -> str:
    """The request: the template, the tasks numbered from 1, and the next number's "Instruction:" to continue."""
    text = template
    for number, task in enumerate(tasks, start=1):
        text += (f"###\n{number}. Instruction: {task.instruction}\n{number}. Input:\n{task.input or '<noinput>'}\n"
                 f"{number}. Output:\n{task.output}\n")
    return text + f"###\n{len(tasks) + 1}. Instruction:"


def parse(reply: str, cut: bool) -> tuple[list[Task], Counter]:
    """The tasks in a reply that continues encode_prompt's text (from task PROMPT_TASKS + 1), and how many were dropped
    by each of Alpaca's filters. `cut`: the reply ended at its token limit, so its last task may be unfinished."""
    first = PROMPT_TASKS + 1
    text = reply if re.match(rf"\s*{first}\.\s+Instruction:", reply) else f"{first}. Instruction:" + reply
    pieces = re.split("###", text)
    tasks, dropped = [], Counter()
    for index, piece in enumerate(pieces):
        if index == len(pieces) - 1 and cut:
            dropped["cut off by the length limit"] += 1
            continue
        parts = re.split(rf"{index + first}\.\s+(Instruction|Input|Output):", piece)
        if len(parts) != 7:
            if piece.strip():
                dropped["not in the numbered form"] += 1
            continue
        given = parts[4].strip()
        task = Task(parts[2].strip(), "" if given.lower() == "<noinput>" else given, parts[6].strip())
        reason = rejected(task.instruction)
        if reason:
            dropped[reason] += 1
        else:
            tasks.append(task)
    return tasks, dropped


def rejected(instruction: str) -> str | None:
    """Which of Alpaca's filters drops this instruction (None: none)."""
    words = len(instruction.split())
    if words <= 3 or words > 150:
        return "3 words or fewer, or over 150"
    if BLACKLISTED.search(instruction):
        return "a task a text model cannot do"
    if instruction.startswith("Write a program"):
        return "write a program"
    if instruction[0] in string.punctuation:
        return "starts with punctuation"
    if not instruction[0].isascii():
        return "starts with a non-ASCII character"
    return None


def rouge_tokens(text: str) -> list[str]:
    """Tokens as rouge_score's ROUGE-L sees them (its default tokenizer: lower case, alphanumeric runs, no stemming)."""
    from rouge_score import tokenize

    return tokenize.tokenize(text, None)


def rouge_l(a: list[str], b: list[str]) -> float:
    """rouge_score's own ROUGE-L F-measure of two token lists (b the candidate, as Alpaca called it)."""
    from rouge_score.rouge_scorer import _score_lcs  # its LCS and F-measure, exactly what Alpaca called

    return _score_lcs(a, b).fmeasure


class NoveltyFilter:
    """The instructions kept so far (seeds first), with an inverted index of their tokens."""

    def __init__(self, instructions: list[str]):
        self.texts: list[str] = []
        self.tokens: list[list[str]] = []
        self.lengths = np.zeros(1024, dtype=np.int64)
        self.postings: dict[str, list] = {}  # token → [ids array, counts array, used]
        for text in instructions:
            self.add(text, rouge_tokens(text))

    def add(self, text: str, tokens: list[str]) -> None:
        number = len(self.texts)
        self.texts.append(text)
        self.tokens.append(tokens)
        if number == len(self.lengths):
            self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
        self.lengths[number] = len(tokens)
        for token, count in Counter(tokens).items():
            posting = self.postings.setdefault(token, [np.zeros(4, np.int64), np.zeros(4, np.int64), 0])
            if posting[2] == len(posting[0]):
                posting[0], posting[1] = (np.concatenate([a, np.zeros_like(a)]) for a in posting[:2])
            posting[0][posting[2]], posting[1][posting[2]] = number, count
            posting[2] += 1

    def nearest(self, tokens: list[str], stop_above: float | None = None) -> tuple[int, float]:
        """(index, ROUGE-L F) of the kept instruction most similar to `tokens` (-1, 0.0 when none shares a token).
        `stop_above`: return as soon as one scores above it (the caller only needs to know that one does)."""
        count = len(self.texts)
        if not tokens or not count:
            return -1, 0.0
        shared = np.zeros(count, dtype=np.int64)
        for token, mine in Counter(tokens).items():
            posting = self.postings.get(token)
            if posting is not None:
                used = posting[2]
                shared[posting[0][:used]] += np.minimum(posting[1][:used], mine)
        candidates = np.flatnonzero(shared)
        # F = 2·LCS/(m+n) ≤ 2·shared/(m+n); a little slack so that float rounding can never prune a real maximum
        bounds = 2 * shared[candidates] / (len(tokens) + self.lengths[candidates]) + 1e-9
        order = np.argsort(-bounds, kind="stable")
        best, best_score = -1, 0.0
        for position in order:
            if bounds[position] < best_score:
                break
            index = int(candidates[position])
            score = rouge_l(self.tokens[index], tokens)
            if score > best_score or best < 0:
                best, best_score = index, score
            if stop_above is not None and best_score > stop_above:
                break
        return best, best_score


def naive_nearest(pool_tokens: list[list[str]], tokens: list[str]) -> tuple[int, float]:
    """The nearest by comparing with every one, as Alpaca did: the reference the filter is tested and benched
    against."""
    scores = [rouge_l(other, tokens) for other in pool_tokens]
    best = int(np.argmax(scores)) if scores else -1
    return best, scores[best] if scores else 0.0


@dataclass
class Generated:
    records: list[dict]  # {instruction, input, output, most_similar_instruction, similarity}
    counts: Counter  # requests, failures, replies with no task, dropped per filter, too similar, kept
    failures: Counter  # why requests failed
    tokens_used: int


def generate(seeds: list[Task], complete, wanted: int, template: str = PROMPT, seed: int = 42,
             batch_size: int = 8, max_requests: int | None = None, progress=None) -> Generated:
    """Tasks until `wanted` are kept or `max_requests` have been made. `complete(prompts)` answers a batch of prompts
    with a Reply (text, finish_reason, tokens) or a Failure (its reason) each, in order."""
    pool = NoveltyFilter([task.instruction for task in seeds])
    records, counts, failures, tokens_used, number = [], Counter(), Counter(), 0, 0
    while len(records) < wanted and (max_requests is None or number < max_requests):
        size = batch_size if max_requests is None else min(batch_size, max_requests - number)
        prompts = [encode_prompt(template, random.Random(f"{seed}:{number + i}").sample(seeds, PROMPT_TASKS))
                   for i in range(size)]
        number += size
        for reply in complete(prompts):
            counts["requests"] += 1
            if not isinstance(reply, Reply):
                counts["failed requests"] += 1
                failures[reply.reason] += 1
                continue
            tokens_used += reply.tokens
            tasks, dropped = parse(reply.text, reply.finish_reason == "length")
            counts["tasks parsed"] += len(tasks) + sum(dropped.values()) - dropped["not in the numbered form"]
            counts.update(dropped)
            counts["replies with no task"] += not tasks
            for task in tasks:
                if len(records) == wanted:
                    break
                tokens = rouge_tokens(task.instruction)
                nearest, score = pool.nearest(tokens, stop_above=THRESHOLD)
                if score > THRESHOLD:
                    counts["too similar (ROUGE-L above 0.7)"] += 1
                    continue
                records.append({"instruction": task.instruction, "input": task.input, "output": task.output,
                                "most_similar_instruction": pool.texts[nearest] if nearest >= 0 else "",
                                "similarity": round(score, 4)})
                pool.add(task.instruction, tokens)
        if progress:
            progress(len(records), counts["requests"])
    counts["kept"] = len(records)
    return Generated(records, counts, failures, tokens_used)


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None
    tokens: int  # as the endpoint counted them (usage.total_tokens), 0 when it did not say

    def dumps(self) -> str:
        return json.dumps([self.text, self.finish_reason, self.tokens])

    @classmethod
    def loads(cls, text: str) -> "Reply":
        return cls(*json.loads(text))
