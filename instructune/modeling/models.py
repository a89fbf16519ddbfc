"""Model stage: load the tokenizer and the causal LM, and give the tokenizer the special tokens training needs."""

import logging
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructune.errors import UserError
from instructune.files import looks_like_hub_id
from instructune.modeling.builtin import BUILTIN_MODELS, builtin_model_path

logger = logging.getLogger("instructune")


def resolve_model_path(name_or_path: str) -> str:
    """A built-in model name becomes its converted folder in the user cache; a local folder or hub id
    (owner/name) is left as is; anything else is a missing folder, said in one line."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_path(name_or_path))
    if not Path(name_or_path).exists() and not looks_like_hub_id(name_or_path):
        raise UserError(f"{name_or_path}: no such model folder (nor a hub id like owner/name, nor a built-in model: "
                        f"{', '.join(BUILTIN_MODELS)})")
    return name_or_path


def load_tokenizer(path: str, cache_dir: str | None = None, trust_remote_code: bool = False):
    """Right padding for training."""
    return AutoTokenizer.from_pretrained(path, padding_side="right", cache_dir=cache_dir,
                                         trust_remote_code=trust_remote_code)


def check_context(path: str, max_length: int, cache_dir: str | None = None, trust_remote_code: bool = False) -> None:
    """Refuse a training length past the model's positions: learned position tables (OPT, GPT-2) fail with an index
    error at the first long row, rotary ones (LLaMA) train silently on positions the model never had."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, cache_dir=cache_dir, trust_remote_code=trust_remote_code).get_text_config()
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and max_length > positions:
        raise UserError(f"--model_max_length {max_length}: longer than {path}'s context ({positions} positions, "
                        f"max_position_embeddings in its config.json); give at most {positions}")


def add_missing_special_tokens(tokenizer, pad_token: str) -> int:
    """Give the tokenizer an EOS and a pad token if it lacks them; returns how many tokens were added.

    A pad token that is already in the vocabulary is reused (no new embedding rows); otherwise it is
    added, which is what Stanford Alpaca did for LLaMA ('[PAD]').
    """
    new_tokens = {}
    if not tokenizer.eos_token:  # early LLaMA conversions had eos == '' and never learned to stop
        new_tokens["eos_token"] = "</s>"
        logger.info("the tokenizer has no EOS token: adding '</s>'")
    if tokenizer.pad_token is None:
        if pad_token in tokenizer.get_vocab():
            tokenizer.pad_token = pad_token
            logger.info("the tokenizer has no pad token: reusing %r (id %d)", pad_token, tokenizer.pad_token_id)
        else:
            new_tokens["pad_token"] = pad_token
            logger.info("the tokenizer has no pad token: adding %r and resizing the embeddings", pad_token)
    return tokenizer.add_special_tokens(new_tokens) if new_tokens else 0


def load_model(path: str, cache_dir: str | None = None, trust_remote_code: bool = False, dtype=torch.float32,
               quantization=None):
    # transformers 5 loads in the checkpoint's dtype by default (bf16 for most hub models); full
    # fine-tuning keeps fp32 master weights and lets --bf16 autocast, as Alpaca did. A quantised base
    # (QLoRA) keeps its unquantised layers in the 4-bit layers' compute dtype.
    if quantization is not None:
        dtype = getattr(quantization, "bnb_4bit_compute_dtype", None) or dtype
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                                                quantization_config=quantization)


def resize_embeddings(model, tokenizer, num_new_tokens: int) -> None:
    """Grow the embeddings to the tokenizer and set the new rows to the mean of the old ones (as Alpaca)."""
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embeddings[0]:  # tied embeddings are one tensor
        embeddings.append(output.weight)
    with torch.no_grad():
        for weight in embeddings:
            weight[-num_new_tokens:] = weight[:-num_new_tokens].mean(dim=0, keepdim=True)


def head_dim(config) -> int:
    """The width of one attention head: the config's own head_dim where it has one (Gemma, Qwen3), else hidden
    size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def parameter_count(parameter) -> int:
    """Elements of a parameter as the model uses it: a ZeRO-3 partition holds none locally (ds_numel has them), a
    4-bit weight packs two to a byte (its quant_state has the shape)."""
    if getattr(parameter, "quant_state", None) is not None:
        return math.prod(parameter.quant_state.shape)
    return getattr(parameter, "ds_numel", None) or parameter.numel()
