"""Prompt sets: instructions to answer (batch generation, the pairwise judge), read from the evaluation sets the
instruction-tuning papers use, each recognised by its keys:
- Alpaca-shaped: instruction, optional input (an `output`, if present, is some model's answer: see `answers`)
- Self-Instruct (user-oriented set, seed tasks): instruction, instances [{input, ...}]: one prompt per instance
- Vicuna: text · Koala: prompt · WizardLM: Instruction
"""

from dataclasses import dataclass
from pathlib import Path

from instructune.data.formats import json_type
from instructune.data.sources import read_json_records
from instructune.errors import DataError

KNOWN = "instruction [+ input] (Alpaca), instruction + instances (Self-Instruct), text (Vicuna), prompt (Koala) or Instruction (WizardLM)"


@dataclass(frozen=True)
class Prompt:
    instruction: str
    input: str = ""

    @property
    def key(self) -> tuple[str, str]:  # answers from two models are matched on it
        return (self.instruction.strip(), self.input.strip())


def read_records(path: str | Path) -> list[tuple[str, object]]:
    """[(where, record)] of a JSON list or a JSON Lines file (the data reader's, U+2028 in strings included)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return list(read_json_records(path))


def prompts_of(where: str, row: object) -> list[Prompt]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got a {json_type(row)}")
    for key in ("instruction", "Instruction", "text", "prompt"):
        if key in row:
            break
    else:
        raise DataError(f"{where}: fits no known prompt format; expected {KNOWN}")
    instruction = row[key]
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: field '{key}' must be a non-empty string")
    if key == "instruction" and "instances" in row:
        instances = row["instances"]
        if not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
            raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, ...}}")
        return [Prompt(instruction, _text(where, i.get("input"), "instances[].input")) for i in instances]
    return [Prompt(instruction, _text(where, row.get("input"), "input"))]


def _text(where: str, value: object, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {json_type(value)}")
    return value


def read_prompts(path: str | Path) -> list[Prompt]:
    prompts = [p for where, row in read_records(path) for p in prompts_of(where, row)]
    if not prompts:
        raise DataError(f"{path}: holds no prompts")
    return prompts


def read_answers(path: str | Path) -> dict[tuple[str, str], str]:
    """A model's answers: Alpaca-shaped lines whose `output` is the answer, by (instruction, input)."""
    answers = {}
    for where, row in read_records(path):
        prompt = prompts_of(where, row)[0]
        output = row.get("output")
        if not isinstance(output, str):
            raise DataError(f"{where}: field 'output' (the model's answer) must be a string, got {json_type(output)}")
        answers[prompt.key] = output
    return answers
