"""Generation: answer an instruction with a trained (or any) model, using the template it was trained on."""

import torch

from instructune import models
from instructune.data.templates import render_prompt, template_adds_special_tokens


def load_for_generation(name_or_path: str):
    path = models.resolve_model_path(name_or_path)
    tokenizer = models.load_tokenizer(path, model_max_length=100_000)
    model = models.load_model(path)
    model.eval()
    return model, tokenizer


@torch.inference_mode()
def answer(model, tokenizer, instruction: str, input: str = "", template: str = "alpaca", max_new_tokens: int = 128):
    """Greedy answer to one instruction, without the prompt and special tokens."""
    prompt = render_prompt(template, instruction, input, tokenizer)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=template_adds_special_tokens(template))
    output = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip()
