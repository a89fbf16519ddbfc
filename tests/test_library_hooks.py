"""The library internals instructune relies on still exist with the parameters it uses (#21 §3): the Trainer's
private hooks (training/trainer.py: PRIVATE_HOOKS) and the internals patched on the CPU (training/distributed.py:
PATCHED_INTERNALS). A transformers, peft or accelerate release that renames one fails here, naming it, instead of
somewhere in a training run."""

import importlib
import inspect

import pytest
from transformers import Trainer

from instructune.training.distributed import PATCHED_INTERNALS
from instructune.training.trainer import PRIVATE_HOOKS, InstructTrainer


@pytest.mark.parametrize("name, parameters", sorted(PRIVATE_HOOKS.items()))
def test_the_trainers_private_hooks_are_still_there(name, parameters):
    assert hasattr(Trainer, name), f"transformers' Trainer has no {name} any more: see PRIVATE_HOOKS"
    found = list(inspect.signature(getattr(Trainer, name)).parameters)[1:]
    assert found[: len(parameters)] == list(parameters), f"Trainer.{name}{tuple(found)}: expected {parameters}"
    assert name in vars(InstructTrainer) or name == "_get_output_dir"  # each one listed is really used


@pytest.mark.parametrize("path, parameters", sorted(PATCHED_INTERNALS.items()))
def test_the_patched_internals_are_still_there(path, parameters):
    module_name, owner_name, attribute = path.rsplit(".", 2)
    owner = getattr(importlib.import_module(module_name), owner_name)
    assert hasattr(owner, attribute), f"{path} is gone: see PATCHED_INTERNALS in training/distributed.py"
    value = getattr(owner, attribute)
    if parameters is None:
        assert isinstance(value, dict), f"{path} is no longer a dict"
    else:
        assert list(inspect.signature(value).parameters)[1:] == list(parameters), f"{path} changed its parameters"


def test_every_private_method_the_trainer_overrides_is_listed():
    """A new private override must be listed (and so tested) too."""
    private = {name for name in vars(InstructTrainer) if name.startswith("_") and not name.startswith("__")}
    assert private <= set(PRIVATE_HOOKS), private - set(PRIVATE_HOOKS)


LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                   "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% else %}<<SYS>>{{ m['content'] }}"
                   "<</SYS>>{% endif %}{% endfor %}")


@pytest.mark.parametrize("template", ["smollm2", "llama2"])
def test_chat_rendering_is_apply_chat_templates(smollm2, template):
    """data/templates.py renders chat templates with the template transformers compiles (its private
    _compile_jinja_template), given what apply_chat_template gives it: the two give the same text, with and without
    a generation prompt, for a template with a default system prompt (SmolLM2's) and one that writes the tokenizer's
    special tokens; several conversations rendered in one call as each is alone."""
    from transformers import AutoTokenizer

    from instructune.data.formats import Message
    from instructune.data.templates import chat_messages, render_chats

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    if template == "llama2":
        tokenizer.chat_template = LLAMA2_TEMPLATE
    conversations = [
        [Message("user", "Name three colours.")],
        [Message("system", "Be brief."), Message("user", "Translate.", "Bonjour  le monde"), Message("assistant", "Hello.")],
        [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "<|im_end|> and [INST] as text"),
         Message("assistant", "Both.")],
    ]
    for generation_prompt in (False, True):
        chats = [chat_messages(messages) for messages in conversations]
        expected = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
                    for chat in chats]
        assert render_chats(chats, tokenizer, generation_prompt) == expected  # all in one call
