"""Adapters: LoRA and QLoRA in the same train.py (peft, bitsandbytes), and merging an adapter into its base.

Training: `--lora_r R` wraps the target modules with LoRA (everything else frozen); `--load_in_4bit`
loads the frozen base in NF4 with double quantisation (QLoRA; bitsandbytes runs it on x86 CPUs too),
`--load_in_8bit` in 8 bits. A pad token that training added trains too (peft's trainable token
indices: only those rows) and is saved with the adapter.

Merging (`instructune merge`, `--merge_adapter`) streams the base folder tensor by tensor in full
precision: W + lora_alpha / r × B·A for every adapted weight, the added token rows (initialised as
training initialised them: the mean of the old rows, then the trained values), the adapter's
tokenizer and the config's vocabulary size. Never into a quantised base: that re-quantises the sum.
"""

import json
import logging
import math
import re
from pathlib import Path

import torch

from instructune.checkpoint.tensorio import DTYPES
from instructune.errors import ConfigError, UserError
from instructune.modeling import models

logger = logging.getLogger("instructune")

PREFIX = "base_model.model."  # peft's prefix of every tensor name in an adapter file
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def target_modules(value: str) -> list[str] | str:
    """'[q_proj,v_proj]', 'q_proj,v_proj' or 'all-linear' (alpaca-lora's list syntax)."""
    value = value.strip()
    if value == "all-linear":
        return value
    names = [v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip()]
    if not names:
        raise ConfigError(f"--lora_target_modules {value!r}: name at least one module, or all-linear")
    return names


def quantization_config(model_args, on_gpu: bool):
    """The BitsAndBytesConfig of --load_in_4bit / --load_in_8bit, or None."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    if not model_args.lora_r:
        raise ConfigError("--load_in_4bit/--load_in_8bit freeze a quantised base: train adapters on it with --lora_r R")
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ConfigError("--load_in_4bit and --load_in_8bit: choose one")
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = DTYPES[model_args.bnb_4bit_compute_dtype or ("bf16" if on_gpu else "fp32")]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=model_args.bnb_4bit_double_quant,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)


def add_lora(model, model_args, new_token_ids: list[int], gradient_checkpointing: bool, seed: int):
    """The model wrapped with LoRA adapters (a peft model); only adapters and the added token rows train.

    The adapters' random initialisation is drawn from `seed` right here: how much randomness loading the
    model used differs between strategies (ZeRO-3 builds it partitioned), and the same seed must give
    the same adapter under every one of them."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=target_modules(model_args.lora_target_modules), task_type="CAUSAL_LM",
        trainable_token_indices=new_token_ids or None,
    )
    set_seed(seed)
    try:
        model = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules that the model does not have
        raise ConfigError(f"--lora_target_modules: {str(e).splitlines()[0]}") from None
    trainable = sum(models.parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(models.parameter_count(p) for p in model.parameters())
    logger.info("LoRA r=%d on %s: %s of %s parameters train (%.2f%%)", model_args.lora_r, model_args.lora_target_modules,
                f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def read_adapter(adapter: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, {tensor name without peft's prefix: tensor}) of a plain LoRA adapter folder."""
    from safetensors import safe_open

    if not is_adapter(adapter):
        raise UserError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise UserError(f"{adapter}: only plain LoRA adapters merge here (this one: {config.get('peft_type')}"
                        f"{', DoRA' if config.get('use_dora') else ''}{', fan_in_fan_out' if config.get('fan_in_fan_out') else ''})")
    with safe_open(adapter / ADAPTER_WEIGHTS, framework="pt") as f:
        lora = {name.removeprefix(PREFIX): f.get_tensor(name) for name in f.keys()}
    return config, lora


def check_adapter(adapter: Path, config: dict, lora: dict, base: str, base_shapes: dict[str, tuple]) -> None:
    """The adapter's weights fit `base` (every adapted weight there, of the shapes B·A adds to), have the rank its
    config says, and belong to modules its target_modules name: merge and generate then agree, or neither runs."""
    adapted = sorted(k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight"))
    if not adapted:
        raise UserError(f"{adapter}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    targets = config.get("target_modules")
    for module in adapted:
        if isinstance(targets, str):  # peft: a regular expression over the full name, or all-linear
            targeted = targets == "all-linear" or re.fullmatch(targets, module)
        else:  # peft: a module name or the end of one
            targeted = any(module == t or module.endswith(f".{t}") for t in targets or [])
        if not targeted:
            raise UserError(f"{adapter}: adapts {module}, which its target_modules {targets} do not name")
        name, a, b = f"{module}.weight", lora[f"{module}.lora_A.weight"], lora.get(f"{module}.lora_B.weight")
        if name not in base_shapes:
            raise UserError(f"{adapter}: adapts weights that {base} does not have: {name}")
        rank = _per_module(config, "rank_pattern", module, config["r"])
        out_features, in_features = base_shapes[name][:2]
        if b is None or tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise UserError(f"{adapter}: {module}'s LoRA weights are {tuple(a.shape)} and "
                            f"{None if b is None else tuple(b.shape)}; rank {rank} (adapter_config.json) on {base}'s "
                            f"{tuple(base_shapes[name])} weight needs {(rank, in_features)} and {(out_features, rank)}")


def _per_module(config: dict, patterns: str, module: str, default):
    """A module's own value from peft's rank_pattern or alpha_pattern (a key matching the name's end), else `default`."""
    for pattern, value in (config.get(patterns) or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default


def load_merged(adapter: str | Path, tokenizer, dtype=torch.float32, base: str | None = None):
    """The adapter's base model (unquantised, resized to the adapter's tokenizer) with the adapter merged in; `base`
    instead of the one the adapter's config names (a copy of it elsewhere). Checked against the base first."""
    from peft import PeftModel

    config, lora = read_adapter(Path(adapter))
    base = base or config["base_model_name_or_path"]
    model = models.load_model(models.resolve_model_path(base), dtype=dtype)
    added = len(tokenizer) - model.get_input_embeddings().weight.shape[0]
    if added > 0:
        models.resize_embeddings(model, tokenizer, added)
    check_adapter(Path(adapter), config, lora, base, {n: tuple(t.shape) for n, t in model.state_dict().items()})
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def merge(base: str | Path, adapter: str | Path, output: str | Path, max_shard_size: str = "5GB",
          dtype: str | None = None) -> int:
    """Write base + adapter as a full Hugging Face folder, tensor by tensor; returns the tensors merged."""
    from instructune.checkpoint.shard import write_model_folder
    from instructune.checkpoint.tensorio import MODEL_FILES, TensorFolder

    adapter = Path(adapter)
    config, lora = read_adapter(adapter)
    reader = TensorFolder(base)
    check_adapter(adapter, config, lora, str(base), {name: info.shape for name, info in reader.tensors.items()})
    token_rows = _token_rows(config, lora)
    if missing := sorted(set(token_rows) - set(reader.names())):  # a base of another shape: write nothing
        raise UserError(f"{adapter}: adapts weights that {base} does not have: {', '.join(missing[:3])}")
    vocabulary = _tokenizer_length(adapter)
    merged = set()

    def load(name: str):
        def merged_tensor() -> torch.Tensor:
            weight = reader.get(name)
            module = name.removesuffix(".weight")
            if f"{module}.lora_A.weight" in lora:
                a, b = lora[f"{module}.lora_A.weight"].float(), lora[f"{module}.lora_B.weight"].float()
                rank = _per_module(config, "rank_pattern", module, config["r"])
                alpha = _per_module(config, "alpha_pattern", module, config["lora_alpha"])
                scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
                weight = (weight.float() + scale * (b @ a)).to(weight.dtype)
                merged.add(name)
            if name in embedding_names and vocabulary > weight.shape[0]:  # rows that training added, as it added them
                mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
                weight = torch.cat([weight, mean.expand(vocabulary - weight.shape[0], -1)])
            if name in token_rows:
                indices, values = token_rows[name]
                weight = weight.index_copy(0, indices, values.to(weight.dtype))
                merged.add(name)
            return weight
        return merged_tensor

    embedding_names = {n for n in reader.names() if n.endswith(("embed_tokens.weight", "lm_head.weight"))}
    tensors = []
    for name, info in reader.tensors.items():
        shape = info.shape
        if name in embedding_names and vocabulary > shape[0]:
            shape = (vocabulary, *shape[1:])
        tensors.append((name, shape, info.dtype, load(name)))

    def finish(staging: Path) -> None:  # the adapter's tokenizer (with the pad token) and the vocabulary it needs
        for file in adapter.iterdir():
            if file.is_file() and MODEL_FILES.match(file.name) and file.name not in ("config.json", "generation_config.json"):
                (staging / file.name).write_bytes(file.read_bytes())
        staged = json.loads((staging / "config.json").read_text())
        if vocabulary > staged.get("vocab_size", 0):
            (staging / "config.json").write_text(json.dumps(staged | {"vocab_size": vocabulary}, indent=2) + "\n")

    write_model_folder(tensors, Path(output), reader.path, max_shard_size, dtype, finish=finish)
    return len(merged)


def _token_rows(config: dict, lora: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{base tensor name: (row indices, trained rows)} of peft's trainable tokens."""
    indices = config.get("trainable_token_indices")
    rows = {}
    for key, values in lora.items():
        if not key.endswith(TOKEN_DELTA):
            continue
        module = key.removesuffix(TOKEN_DELTA)
        chosen = indices if isinstance(indices, list) else indices[module.rsplit(".", 1)[-1]]
        rows[f"{module}.weight"] = (torch.tensor(chosen), values)
    return rows


def _tokenizer_length(folder: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder))
