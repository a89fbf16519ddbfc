"""Prompt templates: how an instruction record becomes the text the model is asked to continue."""

# Stanford Alpaca's two templates, verbatim: the released Alpaca models expect exactly these.
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


def render_prompt(template: str, instruction: str, input: str, tokenizer) -> str:
    """The prompt text for one record; the response is appended after it by the caller."""
    if template == "alpaca":
        pattern = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
        return pattern.format(instruction=instruction, input=input)
    if template == "chat":
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def template_adds_special_tokens(template: str) -> bool:
    """Whether the tokenizer should add its own BOS: a chat template already writes its special tokens."""
    return template != "chat"
