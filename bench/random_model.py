"""A randomly initialised LLaMA with SmolLM2's tokenizer, saved as a Hugging Face folder: the larger models the benches
measure without downloading any (speed and memory need a model's shape, not trained weights).

    .venv/bin/python bench/random_model.py OUT --size 1b        # ~1.1B parameters (TinyLlama's shape), ~4.4 GB in fp32
    .venv/bin/python bench/random_model.py OUT --size 420m --layers 24

Sizes: tiny (4 layers of 256: ~29M parameters, most of them the embeddings of SmolLM2's 49K vocabulary), 420m (1024 wide; --layers sets the depth, 24 by
default), 1b (2048 wide, 22 layers, grouped-query attention 32/4).
"""

import argparse
import sys
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "420m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, tie_word_embeddings=False),
}


def random_llama(folder: Path | str, size: str = "tiny", layers: int | None = None) -> str:
    """Writes the model (fp32, seed 0, 500 MB shards) and SmolLM2's tokenizer into folder; returns its path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from instructune.modeling.builtin import builtin_model_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("smollm2-135m"))
    shape = {**SHAPES[size], **({"num_hidden_layers": layers} if layers else {})}
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="500MB")
    tokenizer.save_pretrained(folder)
    return str(folder)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--size", choices=SHAPES, default="tiny")
    parser.add_argument("--layers", type=int, help="the depth instead of the size's")
    options = parser.parse_args()
    print(random_llama(options.folder, options.size, options.layers))
