"""Pairwise judging as AlpaGasus (after Vicuna) did it: a judge model scores two answers to the same instruction 1–10,
once in each order to cancel its position bias, and each pair is a win, a tie or a loss for model A:

    win:  better in both orders, or better in one and equal in the other
    tie:  equal in both, or better in one and worse in the other (the judge followed the position)
    lose: the mirror of a win

The judge answers with a first line "s1 s2" (the scores of assistant 1 and 2), then its reasons. A reply without
that line, or a request that failed, makes the pair a failure, counted apart and never given a verdict.
"""

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from instructune.data.prompts import Prompt
from instructune.files import png_figure
from instructune.inference.client import ChatClient, Failure

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_PROMPT = """[Question]
{question}

[The Start of Assistant 1's Answer]
{first}

[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{second}

[The End of Assistant 2's Answer]

[System]
We would like to request your feedback on the performance of two AI assistants in response to the user question \
displayed above.
Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an \
overall score on a scale of 1 to 10, where a higher score indicates better overall performance.
Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, \
respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive \
explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses were \
presented does not affect your judgment.
"""
SCORES = re.compile(r"^\W*(\d+(?:\.\d+)?)(?:\s*/\s*10)?\s*[,\s]\s*(\d+(?:\.\d+)?)(?:\s*/\s*10)?\W*$")
OUTCOMES = ("win", "tie", "lose")


@dataclass
class Pair:
    test_set: str
    prompt: Prompt
    answer_a: str
    answer_b: str


@dataclass
class Judged:
    test_set: str
    instruction: str
    input: str
    answer_a: str
    answer_b: str
    verdict: str  # win | tie | lose (for model A) | failed
    scores_a_first: list[float] | None  # [A, B] when A was shown first
    scores_b_first: list[float] | None  # [B, A] when B was shown first
    reasons: list[str]  # the judge's reasons (or the failures), in those two orders


def question(prompt: Prompt) -> str:
    return f"{prompt.instruction}\n\n{prompt.input}" if prompt.input else prompt.instruction


def judge_request(prompt: Prompt, first: str, second: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": JUDGE_PROMPT.format(question=question(prompt), first=first, second=second)}]


def parse_scores(reply: str) -> tuple[tuple[float, float], str] | None:
    """((s1, s2), reasons) from a reply whose first non-empty line holds the two scores ("8 7", "8, 7", "8/10 7/10");
    None if it does not, or a score is outside 1–10."""
    lines = [line for line in reply.strip().split("\n") if line.strip()]
    match = SCORES.match(lines[0]) if lines else None
    if not match:
        return None
    scores = float(match.group(1)), float(match.group(2))
    return (scores, "\n".join(lines[1:]).strip()) if all(1 <= s <= 10 for s in scores) else None


def verdict(a_first: tuple[float, float], b_first: tuple[float, float]) -> str:
    """Model A's outcome from [A, B] scored with A first and [B, A] with B first."""
    total = _sign(a_first[0] - a_first[1]) + _sign(b_first[1] - b_first[0])
    return "win" if total > 0 else "lose" if total < 0 else "tie"


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def judge(pairs: list[Pair], client: ChatClient) -> list[Judged]:
    def unparseable(reply: str) -> str | None:
        return None if parse_scores(reply) else "no 's1 s2' score line in the judge's reply"

    requests = [judge_request(p.prompt, p.answer_a, p.answer_b) for p in pairs]
    requests += [judge_request(p.prompt, p.answer_b, p.answer_a) for p in pairs]
    replies = client.complete_all(requests, accept=unparseable, desc="judging")
    judged = []
    for pair, a_first, b_first in zip(pairs, replies[: len(pairs)], replies[len(pairs):]):
        parsed = [None if isinstance(r, Failure) else parse_scores(r) for r in (a_first, b_first)]
        reasons = [r.reason if isinstance(r, Failure) else p[1] for r, p in zip((a_first, b_first), parsed)]
        outcome = verdict(parsed[0][0], parsed[1][0]) if all(parsed) else "failed"
        judged.append(Judged(pair.test_set, pair.prompt.instruction, pair.prompt.input, pair.answer_a, pair.answer_b,
                             outcome, list(parsed[0][0]) if parsed[0] else None,
                             list(parsed[1][0]) if parsed[1] else None, reasons))
    return judged


def tally(judged: list[Judged]) -> dict[str, dict[str, int]]:
    """{test set: {win, tie, lose, failed}} in the order the sets came, then "overall"."""
    counts: dict[str, Counter] = {}
    for entry in judged:
        counts.setdefault(entry.test_set, Counter())[entry.verdict] += 1
    counts["overall"] = sum(counts.values(), Counter())
    return {name: {k: c[k] for k in (*OUTCOMES, "failed")} for name, c in counts.items()}


def write_report(judged: list[Judged], names: tuple[str, str], judge_model: str, output_dir: Path) -> dict:
    """judgement.json (counts per test set and overall, every pair's verdict, scores and reasons) and judgement.png."""
    counts = tally(judged)
    report = {"model_a": names[0], "model_b": names[1], "judge_model": judge_model, "counts": counts,
              "pairs": [asdict(entry) for entry in judged]}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "judgement.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    plot(counts, names, judge_model, output_dir / "judgement.png")
    return report


def plot(counts: dict[str, dict[str, int]], names: tuple[str, str], judge_model: str, path: Path) -> None:
    """AlpaGasus' figure: one horizontal bar per test set, split into A's wins, ties and losses."""
    sets = list(counts)
    with png_figure(path, size=(8, 0.6 * len(sets) + 1.6)) as (_, axes):
        left = [0] * len(sets)
        for outcome, colour in zip(OUTCOMES, ("#4c72b0", "#c8c8c8", "#dd8452")):
            widths = [counts[s][outcome] for s in sets]
            bars = axes.barh(sets, widths, left=left, color=colour, label={"win": f"{names[0]} wins", "tie": "tie",
                                                                            "lose": f"{names[1]} wins"}[outcome])
            axes.bar_label(bars, labels=[str(w) if w else "" for w in widths], label_type="center", fontsize=9)
            left = [l + w for l, w in zip(left, widths)]
        axes.invert_yaxis()
        axes.set_xlabel("pairs of answers")
        axes.set_title(f"{names[0]} vs {names[1]}, judged by {judge_model} in both orders", fontsize=10)
        axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=3, frameon=False, fontsize=9)
