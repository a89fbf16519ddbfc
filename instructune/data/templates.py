"""Prompt templates: a conversation → text, in segments that are targets (assistant turns) or not.

Single-turn instruction records (Alpaca, Dolly, Self-Instruct) use --prompt_template: `alpaca`
(Stanford Alpaca's two templates, byte for byte: the released Alpaca models expect exactly these) or
`chat` (the tokenizer's chat template). Multi-turn conversations (ShareGPT, messages) always use the
tokenizer's chat template, which renders their system prompts and turns as the model knows them.
"""

from instructune.data.formats import Conversation, Message
from instructune.errors import DataError

# Stanford Alpaca's two templates, verbatim.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

TEMPLATES = ("alpaca", "chat")


def template_for(conversation: Conversation, template: str) -> str:
    return "chat" if conversation.multi_turn else template


def render_prompt(template: str, messages: list[Message], tokenizer) -> str:
    """The text the model continues to write the next assistant turn (generation)."""
    if template == "alpaca":
        user = messages[-1]
        pattern = ALPACA_WITH_INPUT if user.context else ALPACA_NO_INPUT
        return pattern.format(instruction=user.content, input=user.context)
    if template == "chat":
        return render_chats([chat_messages(messages)], tokenizer, add_generation_prompt=True)[0]
    raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def render_chats(chats: list[list[dict]], tokenizer, add_generation_prompt: bool = False) -> list[str]:
    """What tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=...) returns for each chat
    (chat_messages), rendered by the template transformers compiles for it (its sandboxed Jinja environment, cached
    per template) with the arguments apply_chat_template gives it. The call's own preparation (checks, its copy of
    each chat into plain data, reasoning fields aliased: nothing changes for chats of plain strings) cost a fifth of
    rendering a chat (bench/data_scale.py's chats), and preparing a chat record renders twice per assistant turn.
    `_compile_jinja_template` is private: tests/test_library_hooks.py keeps the two renderings equal, and fails if
    it goes."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if not chats:  # a tokenizer without a chat template renders no chat
        return []
    template = _compile_jinja_template(tokenizer.get_chat_template())
    special_tokens = tokenizer.special_tokens_map
    return [template.render(messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                            **special_tokens) for chat in chats]


def chat_messages(messages) -> list[dict]:
    return [{"role": m.role, "content": f"{m.content}\n\n{m.context}" if m.context else m.content} for m in messages]


def render_segments(conversations: list[Conversation], template: str, tokenizer) -> list[list[tuple[str, bool]]]:
    """For each conversation, [(text, is_target)] whose concatenation is the whole rendered conversation.

    alpaca: [(prompt, False), (response, True)]; the caller appends EOS as a target. chat: each
    assistant turn is the template's rendering of it (up to and including the EOS token), found as
    the difference between the rendering up to it and the prompt that asks for it; the template
    writes its own end-of-turn tokens, so nothing is appended. The chat templates' renderings of all
    the conversations are made in two calls (prompts, and conversations up to each assistant turn).
    """
    templates = [template_for(c, template) for c in conversations]
    turns = [[i for i, m in enumerate(c.messages) if m.role == "assistant"] if t == "chat" else []
             for c, t in zip(conversations, templates)]
    chats = [chat_messages(c.messages) if indices else [] for c, indices in zip(conversations, turns)]
    asked = [(chat[:i], chat[:i + 1]) for chat, indices in zip(chats, turns) for i in indices]
    try:
        prompts = iter(render_chats([prompt for prompt, _ in asked], tokenizer, add_generation_prompt=True))
        fulls = iter(render_chats([full for _, full in asked], tokenizer))
    except Exception as e:  # a template that refuses a conversation (roles must alternate, ...): name the record
        refused = next((c for c, indices in zip(conversations, turns) if indices and _refused(c, tokenizer)), None)
        if refused is None:
            raise
        raise DataError(f"{refused.source}: the tokenizer's chat template refuses this conversation: "
                        f"{type(e).__name__}: {e}") from None
    rendered = []
    for conversation, chosen, indices in zip(conversations, templates, turns):
        if chosen == "alpaca":
            messages = conversation.messages
            rendered.append([(render_prompt("alpaca", messages[:-1], tokenizer), False), (messages[-1].content, True)])
        else:
            renderings = [(next(prompts), next(fulls)) for _ in indices]
            rendered.append(_chat_segments(conversation, renderings, tokenizer.eos_token))
    return rendered


def _chat_segments(conversation: Conversation, renderings: list[tuple[str, str]], eos: str) -> list[tuple[str, bool]]:
    """A chat's segments, from the renderings of each assistant turn: the prompt up to it, the chat through it."""
    segments, done = [], ""
    for prompt, full in renderings:
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{conversation.source}: the tokenizer's chat template does not render this conversation "
                            "turn by turn (a later turn changes an earlier one), so its targets cannot be marked")
        answer = full[len(prompt):]
        end = answer.find(eos) + len(eos) if eos in answer else len(answer)
        segments += [(prompt[len(done):], False), (answer[:end], True)]
        done = prompt + answer[:end]
    return segments


def _refused(conversation: Conversation, tokenizer) -> bool:
    try:
        render_chats([chat_messages(conversation.messages)], tokenizer)
        return False
    except Exception:
        return True


def template_adds_special_tokens(template: str) -> bool:
    """Whether the tokenizer should add its own BOS: a chat template already writes its special tokens."""
    return template != "chat"
