"""Instruction formats → one internal shape, a conversation (a list of system/user/assistant messages).

Each record's format is recognised by its keys (or named for a whole dataset):
- alpaca: instruction, optional input, output (Stanford Alpaca; also the shared Dolly 3K subset)
- dolly: instruction, optional context, response, category (databricks-dolly-15k)
- self-instruct: instruction, instances [{input, output}]: one conversation per instance
- sharegpt: conversations [{from, value}] (from: system, human/user, gpt/assistant), multi-turn
- messages: messages [{role, content}] (OpenAI/HF chat), multi-turn
Preference pairs (for --method dpo), one conversation whose last assistant turn is the chosen reply, with the
rejected reply beside it:
- preference: prompt, chosen, rejected (TRL's): plain strings, or message lists (the prompt's messages, and the
  replies as [{role: assistant, content}]); UltraFeedback-binarized's chosen/rejected are whole conversations that
  share the prompt's messages
- hh: chosen, rejected as two "\n\nHuman: ... \n\nAssistant: ..." transcripts with a shared prefix (Anthropic HH)
A pair whose replies are equal, or whose two conversations do not share their prompt, is refused.
Structural faults are errors that name the record and what was expected. A record whose
instruction, output or any turn is empty is skipped and counted (per field), as Stanford Alpaca's
train.py trains past them, or refused with strict=True.
"""

import json
import re
from dataclasses import dataclass, replace

from instructune.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
FORMATS = ("alpaca", "dolly", "self-instruct", "sharegpt", "messages", "preference", "hh")
CHAT_FORMATS = ("sharegpt", "messages", "hh")  # multi-turn: rendered with the tokenizer's chat template
PAIR_FORMATS = ("preference", "hh")  # chosen/rejected pairs: --method dpo
EXPECTED = ("instruction/output (Alpaca), instruction/context/response (Dolly), instruction/instances "
            "(Self-Instruct), conversations [{from, value}] (ShareGPT), messages [{role, content}], "
            "prompt/chosen/rejected (preference pairs) or chosen/rejected transcripts (HH)")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


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
    rejected: str | None = None  # a preference pair: the rejected reply in place of the last (chosen) one

    @property
    def multi_turn(self) -> bool:
        # More than one exchange, or a system prompt, needs the chat template whatever the format.
        return self.format in CHAT_FORMATS or len(self.messages) > 2 or self.messages[0].role == "system"

    def with_rejected_reply(self) -> "Conversation":
        """The pair's other conversation: the same prompt, answered with the rejected reply."""
        return replace(self, messages=(*self.messages[:-1], Message("assistant", self.rejected)), rejected=None)


def to_row(conversation: Conversation) -> str:
    """A conversation as one JSON text: how mixes and the tokenisation cache store it."""
    row = {"messages": [[m.role, m.content, m.context] for m in conversation.messages],
           "format": conversation.format, "source": conversation.source}
    if conversation.rejected is not None:
        row["rejected"] = conversation.rejected
    return json.dumps(row, ensure_ascii=False)


def from_row(row: str) -> Conversation:
    data = json.loads(row)
    return Conversation(tuple(Message(*m) for m in data["messages"]), data["format"], data["source"],
                        data.get("rejected"))


def instruction(text: str, context: str, response: str, format: str, source: str) -> Conversation:
    return Conversation((Message("user", text, context), Message("assistant", response)), format, source)


def detect(row: dict) -> str | None:
    if "chosen" in row and "rejected" in row:
        return "preference" if "prompt" in row else "hh"
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
    if format in ("preference", "hh"):
        return preference_pair(where, row, format)
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
    key = "conversations" if format == "sharegpt" else "messages"
    messages = _messages(where, row, key, format)
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn")
    empty = [f"{m.role} turn" for m in messages if not m.content.strip()]
    return [Conversation(tuple(messages), format, where)], empty[:1]


def _messages(where: str, row: dict, key: str, format: str = "messages") -> list[Message]:
    """row[key] as messages: ShareGPT's [{from, value}] or [{role, content}]."""
    role_key, content_key = ("from", "value") if format == "sharegpt" else ("role", "content")
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
    return messages


def preference_pair(where: str, row: dict, format: str) -> tuple[list[Conversation], list[str]]:
    """A preference record → one conversation ending with the chosen reply, the rejected reply beside it."""
    sides = {name: _side(where, row, name, format) for name in ("chosen", "rejected")}
    if format == "preference":
        prompt = (_messages(where, row, "prompt") if isinstance(row.get("prompt"), list)
                  else [Message("user", _string(where, row, "prompt"))])
        if all(len(side) == 1 for side in sides.values()):  # replies only (TRL's): the prompt is apart
            sides = {name: prompt + side for name, side in sides.items()}
        elif not _same_prompt(prompt, sides["chosen"][:-1]):  # whole conversations (UltraFeedback's)
            raise DataError(f"{where}: field 'prompt' is not the prompt that chosen and rejected answer")
    chosen, rejected = sides["chosen"], sides["rejected"]
    for name, side in sides.items():
        if side[-1].role != "assistant" or not any(m.role == "user" for m in side[:-1]):
            raise DataError(f"{where}: field '{name}' must end with an assistant reply to a user prompt")
    if chosen[:-1] != rejected[:-1]:
        turn = next(i for i, (a, b) in enumerate(zip(chosen + [None], rejected + [None])) if a != b)
        raise DataError(f"{where}: chosen and rejected differ before their last reply (at turn {turn}): a pair must "
                        "answer the same prompt")
    if chosen[-1].content == rejected[-1].content:
        raise DataError(f"{where}: chosen and rejected are the same reply, so there is no preference to learn")
    empty = [name for name, side in sides.items() if not side[-1].content.strip()]
    empty += [f"{m.role} turn" for m in chosen[:-1] if not m.content.strip()]
    return [Conversation(tuple(chosen), format, where, rejected[-1].content)], empty[:1]


def _same_prompt(prompt: list[Message], conversation: list[Message]) -> bool:
    """UltraFeedback's prompt is the user's text; a message-list prompt must be the conversation's beginning."""
    if len(prompt) == 1 and prompt[0].role == "user":
        return any(m.role == "user" and m.content.strip() == prompt[0].content.strip() for m in conversation)
    return conversation[:len(prompt)] == prompt


def _side(where: str, row: dict, name: str, format: str) -> list[Message]:
    """One side of a pair as messages: a transcript (HH), a message list, or a plain reply."""
    value = row.get(name)
    if format == "hh":
        text = _string(where, row, name)
        parts = HH_TURN.split(text)  # [before, role, text, role, text, ...]
        if len(parts) < 5 or parts[0].strip():
            raise DataError(f"{where}: field '{name}' must be a transcript of \"\\n\\nHuman: ...\" and "
                            "\"\\n\\nAssistant: ...\" turns")
        return [Message("user" if role == "Human" else "assistant", content.strip())
                for role, content in zip(parts[1::2], parts[2::2])]
    if isinstance(value, list):
        return _messages(where, row, name)
    return [Message("assistant", _string(where, row, name))]


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
