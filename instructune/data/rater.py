"""The AlpaGasus-style quality filter (`data filter`): a rater model scores every record 0–5 for the accuracy and helpfulness of
its response, and the records at or above a threshold are kept (AlpaGasus kept Alpaca's records rated
4.5 and up: about 9K of 52K, and a better model trained in a fraction of the time).

A reply with no parseable score is a failure, counted apart and never taken for a score; failures
are not cached, so running the same command again retries only them.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from instructune.data.formats import Conversation
from instructune.files import atomic_file, png_figure
from instructune.inference.client import ChatClient, Failure

SYSTEM_PROMPT = "You are a meticulous reviewer of training data for instruction-following language models."
RATING_PROMPT = """Rate how well the response below carries out the instruction (and uses its input, if there is one).

Judge two things: accuracy (is it correct and free of made-up facts?) and helpfulness (does it do what was
asked, completely and clearly?). Give one score from 0 to 5 in steps of 0.5: 5 is flawless, 4 good with
minor issues, 3 acceptable, 2 weak, 1 mostly wrong, 0 useless or harmful.

Answer with the score alone on the first line, then one or two sentences explaining it.

{record}"""
# A score and, if stated, its scale ("4/5", "4 out of 5"): a sign is kept so that "-3" is refused, not read as 3.
NUMBER = r"(-?\d+(?:\.\d+)?)(?:[*_\s]*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?"
SCORE_LINE = re.compile(r"^[^\w-]*(?:score[^\w-]*)?" + NUMBER + r"(?![\d.])", re.IGNORECASE)
SCORE_ANYWHERE = re.compile(r"\bscore\s*(?:is|of|[:=])?\s*" + NUMBER, re.IGNORECASE)


def describe(conversation: Conversation) -> str:
    """The record as the rater sees it."""
    if not conversation.multi_turn:
        user, assistant = conversation.messages
        text = f"### Instruction:\n{user.content}\n\n"
        return text + (f"### Input:\n{user.context}\n\n" if user.context else "") + f"### Response:\n{assistant.content}"
    return "\n\n".join(f"### {m.role.capitalize()}:\n{m.content}" for m in conversation.messages)


def rating_request(conversation: Conversation) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": RATING_PROMPT.format(record=describe(conversation))}]


def parse_score(reply: str) -> tuple[float, str] | None:
    """(score, reason) from a rater's reply: the score on its first non-empty line ('4.5', 'Score: 4', '4/5'),
    or stated as 'score: X' anywhere; None if there is none in 0–5 (on another scale, '4.5/10', or negative)."""
    lines = [line for line in reply.strip().split("\n") if line.strip()]
    if not lines:
        return None
    match = SCORE_LINE.match(lines[0]) or SCORE_ANYWHERE.search(reply)
    if not match or (match.group(2) is not None and float(match.group(2)) != 5):
        return None
    score = float(match.group(1))
    reason = " ".join(lines[1:]).strip() if SCORE_LINE.match(lines[0]) else reply.strip()
    return (score, reason) if 0 <= score <= 5 else None


@dataclass
class Verdicts:
    scores: list[float | None]  # None: a failure
    reasons: list[str]
    failures: Counter = field(default_factory=Counter)


def rate(conversations: list[Conversation], client: ChatClient) -> Verdicts:
    def unparseable(reply: str) -> str | None:
        return None if parse_score(reply) else "no parseable score in the reply"

    replies = client.complete_all([rating_request(c) for c in conversations], accept=unparseable, desc="rating")
    verdicts = Verdicts([], [])
    for reply in replies:
        if isinstance(reply, Failure):
            verdicts.scores.append(None)
            verdicts.reasons.append(reply.reason)
            verdicts.failures[reply.reason.split(" after ")[0]] += 1
        else:
            score, reason = parse_score(reply)
            verdicts.scores.append(score)
            verdicts.reasons.append(reason)
    return verdicts


def as_row(conversation: Conversation) -> dict:
    """A kept record, in Alpaca's fields when it is an instruction record, else as messages."""
    if not conversation.multi_turn:
        user, assistant = conversation.messages
        return {"instruction": user.content, "input": user.context, "output": assistant.content}
    return {"messages": [{"role": m.role, "content": m.content} for m in conversation.messages]}


def write_filtered(conversations: list[Conversation], verdicts: Verdicts, threshold: float, output: Path) -> dict:
    """The kept records into `output` (renamed into place when complete), and the summary beside it."""
    kept = [c for c, s in zip(conversations, verdicts.scores) if s is not None and s >= threshold]
    rated = [s for s in verdicts.scores if s is not None]
    summary = {"records": len(conversations), "kept": len(kept), "dropped": len(rated) - len(kept),
               "failed": len(conversations) - len(rated), "failures": dict(verdicts.failures), "threshold": threshold,
               "score_histogram": {f"{k:g}": v for k, v in sorted(Counter(rated).items())}}
    with atomic_file(output) as f:
        json.dump([as_row(c) for c in kept], f, indent=1, ensure_ascii=False)
    scores = [{"source": c.source, "score": s, "reason": r} for c, s, r in zip(conversations, verdicts.scores, verdicts.reasons)]
    with atomic_file(output.with_suffix(".scores.jsonl")) as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in scores)
    with atomic_file(output.with_suffix(".summary.json")) as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    plot_scores(rated, threshold, output.with_suffix(".scores.png"))
    return summary


def plot_scores(scores: list[float], threshold: float, path: Path) -> None:
    counts = Counter(scores)
    with png_figure(path) as (_, axes):
        axes.bar([f"{s:g}" for s in sorted(counts)], [counts[s] for s in sorted(counts)],
                 color=["tab:green" if s >= threshold else "tab:gray" for s in sorted(counts)])
        axes.set_xlabel(f"rater's score (kept: ≥ {threshold:g})")
        axes.set_ylabel("records")
        axes.set_title(f"{len(scores)} records rated, {sum(s >= threshold for s in scores)} kept")
