"""Instruction formats → one internal shape, a conversation (a list of system/user/assistant messages).

Each record's format is recognised by its keys (or named for a whole dataset):
- alpaca: instruction, optional input, output (Stanford Alpaca; also the shared Dolly 3K subset)
- dolly: instruction, optional context, response, category (databricks-dolly-15k)
- self-instruct: instruction, instances [{input, output}]: one conversation per instance
- sharegpt: conversations [{from, value}] (from: system, human/user, gpt/assistant), multi-turn
- messages: messages [{role, content}] (OpenAI/HF chat), multi-turn
Structural faults are errors that name the record and what was expected. A record whose
instruction, output or any turn is empty is skipped and counted (per field), as Stanford Alpaca's
train.py trains past them, or refused with strict=True.
"""

import json
from dataclasses import dataclass

from instructune.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
FORMATS = ("alpaca", "dolly", "self-instruct", "sharegpt", "messages")
CHAT_FORMATS = ("sharegpt", "messages")  # multi-turn: rendered with the tokenizer's chat template
EXPECTED = ("instruction/output (Alpaca), instruction/context/response (Dolly), instruction/instances "
            "(Self-Instruct), conversations [{from, value}] (ShareGPT) or messages [{role, content}]")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str
    context: str = ""  # a user turn's Alpaca "input" (Dolly's "context"): Alpaca's template gives it its own section


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    format: str
    source: str  # where it came from, for messages: "file: record N"

    @property
    def multi_turn(self) -> bool:
        return self.format in CHAT_FORMATS


def to_row(conversation: Conversation) -> str:
    """A conversation as one JSON text: how mixes and the tokenisation cache store it."""
    return json.dumps({"messages": [[m.role, m.content, m.context] for m in conversation.messages],
                       "format": conversation.format, "source": conversation.source}, ensure_ascii=False)


def from_row(row: str) -> Conversation:
    data = json.loads(row)
    return Conversation(tuple(Message(*m) for m in data["messages"]), data["format"], data["source"])


def instruction(text: str, context: str, response: str, format: str, source: str) -> Conversation:
    return Conversation((Message("user", text, context), Message("assistant", response)), format, source)


def detect(row: dict) -> str | None:
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instances" in row and "instruction" in row:
        return "self-instruct"
    if "response" in row and "instruction" in row:
        return "dolly"
    if "output" in row and "instruction" in row:
        return "alpaca"
    return None


def to_conversations(where: str, row: object, format: str | None = None) -> tuple[list[Conversation], list[str]]:
    """The record's conversations, and the fields found empty (the caller skips or refuses those)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got a {json_type(row)}")
    format = format or detect(row)
    if format is None:
        raise DataError(f"{where}: fits no known format; expected {EXPECTED}")
    if format in ("alpaca", "dolly"):
        names = ("instruction", "input", "output") if format == "alpaca" else ("instruction", "context", "response")
        text, context, response = (_string(where, row, name, optional=name in ("input", "context")) for name in names)
        empty = [name for name, value in zip((names[0], names[2]), (text, response)) if not value.strip()]
        return [instruction(text, context, response, format, where)], empty[:1]
    if format == "self-instruct":
        text = _string(where, row, "instruction")
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
        conversations, empty = [], []
        for i, instance in enumerate(instances):
            place = f"{where}: instance {i}"
            if not isinstance(instance, dict):
                raise DataError(f"{place}: must be an object with input and output")
            output = _string(place, instance, "output")
            conversations.append(instruction(text, _string(place, instance, "input", optional=True), output, format, place))
            if not text.strip() or not output.strip():
                empty.append("instruction" if not text.strip() else "output")
        return conversations, empty[:1]
    key, role_key, content_key = ("conversations", "from", "value") if format == "sharegpt" else ("messages", "role", "content")
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{{role_key}, {content_key}}}")
    messages = []
    for i, turn in enumerate(turns):
        place = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{place}: must be an object with {role_key} and {content_key}")
        named = _string(place, turn, role_key)
        role = SHAREGPT_ROLES.get(named) if format == "sharegpt" else (named if named in ROLES else None)
        if role is None:
            known = sorted(SHAREGPT_ROLES) if format == "sharegpt" else ROLES
            raise DataError(f"{place}: unknown {role_key} {named!r}; expected one of {', '.join(known)}")
        messages.append(Message(role, _string(place, turn, content_key)))
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn")
    empty = [f"{m.role} turn" for m in messages if not m.content.strip()]
    return [Conversation(tuple(messages), format, where)], empty[:1]


def _string(where: str, row: dict, name: str, optional: bool = False) -> str:
    if name not in row and not optional:
        raise DataError(f"{where}: missing field '{name}'")
    value = row.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {json_type(value)}")
    return value


def json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
