"""Generation: answer an instruction with a trained (or any) model, using the template it was trained on."""

import torch

from instructune import adapters, models
from instructune.data.formats import Message
from instructune.data.templates import render_prompt, template_adds_special_tokens
from instructune.errors import UserError


def load_for_generation(name_or_path: str):
    """Model and tokenizer for inference: on the GPU in bf16 when there is one, else on the CPU in fp32
    (bf16 is many times slower than fp32 on CPUs without native bf16)."""
    path = models.resolve_model_path(name_or_path)
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    try:
        tokenizer = models.load_tokenizer(path)
        if adapters.is_adapter(path):  # a LoRA adapter: its base, in full precision, with the adapter merged in
            model = adapters.load_merged(path, tokenizer, dtype)
        else:
            model = models.load_model(path, dtype=dtype)
    except OSError as e:  # transformers' "not a model folder / not on the hub" errors
        raise UserError(f"{name_or_path}: cannot load the model: {e}".splitlines()[0]) from None
    return model.to("cuda" if on_gpu else "cpu").eval(), tokenizer


def max_length(model, tokenizer) -> int:
    """The model's own maximum sequence length (a tokenizer saved without one says 1e30)."""
    limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    return min(int(limit) for limit in limits if limit)


@torch.inference_mode()
def answer(model, tokenizer, instruction: str, input: str = "", template: str = "alpaca", max_new_tokens: int = 128):
    """Greedy answer to one instruction, without the prompt and special tokens."""
    prompt = render_prompt(template, [Message("user", instruction, input)], tokenizer)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=template_adds_special_tokens(template))
    room = max_length(model, tokenizer) - encoded["input_ids"].shape[1]
    if room <= 0:
        raise UserError(f"the prompt is {encoded['input_ids'].shape[1]} tokens; the model takes at most "
                        f"{max_length(model, tokenizer)}")
    output = model.generate(
        **encoded.to(model.device),
        max_new_tokens=min(max_new_tokens, room),
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip()
