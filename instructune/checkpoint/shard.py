"""Re-shard a Hugging Face model folder (single file or sharded, safetensors or .bin) into safetensors
shards of a chosen size, optionally in another dtype, one tensor at a time."""

import json
from pathlib import Path

from tqdm.auto import tqdm

from instructune.checkpoint.tensorio import DTYPES, ShardWriter, TensorFolder, copy_model_files
from instructune.files import atomic_folder


def write_model_folder(tensors, destination: Path, config_source: Path, max_shard_size: str, dtype: str | None,
                       finish=None):
    """Write `tensors` ([(name, shape, dtype, load)] where load() gives the tensor) as a complete
    Hugging Face folder: shards, index, and the config and tokenizer files of `config_source`;
    `finish(staging)` may add or change files before the folder appears."""
    target = DTYPES[dtype] if dtype else None

    def cast(tensor_dtype):
        return target if target is not None and tensor_dtype.is_floating_point else tensor_dtype

    with atomic_folder(destination) as staging:
        writer = ShardWriter(staging, [(name, shape, cast(t)) for name, shape, t, _ in tensors], max_shard_size)
        for name, _, tensor_dtype, load in tqdm(tensors, desc=f"writing {destination.name}", unit="tensor"):
            writer.write(name, load().to(cast(tensor_dtype)).contiguous())
        writer.close()
        copy_model_files(config_source, staging)
        config_file = staging / "config.json"
        if target is not None and config_file.exists():
            config = json.loads(config_file.read_text())
            config["dtype"] = str(target).removeprefix("torch.")
            config.pop("torch_dtype", None)
            config_file.write_text(json.dumps(config, indent=2) + "\n")
        if finish is not None:
            finish(staging)


def reshard(source: str | Path, destination: str | Path, max_shard_size: str = "5GB", dtype: str | None = None) -> int:
    """Returns the number of tensors written."""
    reader = TensorFolder(source)
    tensors = [(n, i.shape, i.dtype, lambda n=n: reader.get(n)) for n, i in reader.tensors.items()]
    write_model_folder(tensors, Path(destination), reader.path, max_shard_size, dtype)
    return len(tensors)
