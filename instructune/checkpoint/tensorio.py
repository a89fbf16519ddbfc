"""Tensor-by-tensor reading and writing of Hugging Face model folders, so that whole-model tools
(weight diffs, re-sharding) need memory for one tensor, not for the model.

Reading: safetensors files through `safe_open` (memory-mapped), `.bin` files through
`torch.load(weights_only=True, mmap=True)`; single files or sharded with an index.
Writing: the safetensors library writes whole dicts only, so `ShardWriter` lays out shards from
the tensors' shapes first and then streams each tensor's bytes into its place: the files are
ordinary safetensors shards with a standard `model.safetensors.index.json`.
"""

import hashlib
import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from instructune.errors import UserError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names the commands take


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '200KB' or a number of bytes → bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", size.upper())
    if not match:
        raise UserError(f"not a size: {size!r} (e.g. '5GB', '500MB')")
    scale = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(match.group(1)) * scale[match.group(2)])


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_as_bytes(tensor)).hexdigest()


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a sharded model's index file, validated: {tensor name: shard file name}."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{index}: not a model index (a JSON object with a 'weight_map')") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UserError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def inside(folder: Path, name: str, named_by: Path) -> Path:
    """folder/name, refused unless it is a plain file name in the folder (no '..', no link out of it)."""
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or path.is_symlink():
        raise UserError(f"{named_by}: names {name!r}, which is not a file of {folder}")
    return path


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class TensorFolder:
    """The weights of a Hugging Face model folder, read one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such model folder")
        self.tensors: dict[str, TensorInfo] = {}
        self._bin_cache: tuple[Path, dict] | None = None
        for file in self._weight_files():
            for info in self._read_header(file):
                self.tensors.setdefault(info.name, info)

    def _weight_files(self) -> list[Path]:
        for stem in ("model.safetensors", "pytorch_model.bin"):
            index = self.path / f"{stem}.index.json"
            if index.exists():
                return [inside(self.path, name, index) for name in dict.fromkeys(read_index(index).values())]
            if (self.path / stem).exists():
                return [inside(self.path, stem, self.path)]
        if (self.path / "adapter_config.json").exists():
            raise UserError(f"{self.path}: a LoRA adapter, not a model; merge it into its base first "
                            "(instructune merge --base BASE --adapter ADAPTER --output FOLDER)")
        raise UserError(f"{self.path}: no model weights (model.safetensors or pytorch_model.bin, single or sharded)")

    def _read_header(self, file: Path) -> list[TensorInfo]:
        if not file.exists():
            raise UserError(f"{file}: weight file listed in the index is missing")
        if file.suffix == ".bin":
            return [TensorInfo(n, tuple(t.shape), t.dtype, file) for n, t in self._load_bin(file).items()]
        try:
            with safe_open(file, framework="pt") as f:
                slices = {n: f.get_slice(n) for n in f.keys()}
                return [TensorInfo(n, tuple(t.get_shape()), SAFETENSORS_DTYPES[t.get_dtype()], file) for n, t in slices.items()]
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None

    def _load_bin(self, file: Path) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != file:
            # weights_only: a .bin file is a pickle and must not run code; mmap: read pages lazily
            self._bin_cache = (file, torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        return self._bin_cache[1]

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.file.suffix == ".bin":
            return self._load_bin(info.file)[name]
        try:
            with safe_open(info.file, framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise UserError(f"{info.file}: cannot read tensor {name} ({e})") from None


class ShardWriter:
    """Writes tensors, given in a known order with known shapes and dtypes, as safetensors shards.

    Peak memory is one tensor: each shard's header is written from the plan, then every tensor's
    bytes are appended as it arrives. One shard is `model.safetensors`; several get an index.
    """

    def __init__(self, directory: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: str | int):
        self.directory = directory
        limit = parse_size(max_shard_size)
        shards: list[list[TensorInfo]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            info = TensorInfo(name, tuple(shape), dtype, Path())
            if shards[-1] and size + info.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(info)
            size += info.nbytes
        count = len(shards)
        self.files = ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        self.shard_of = {info.name: i for i, shard in enumerate(shards) for info in shard}
        self.shards = shards
        self.expected = [info for shard in shards for info in shard]
        self.position = 0
        self.handle = None
        self.current = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        info = self.expected[self.position]
        if name != info.name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise ValueError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not follow the plan ({info})")
        shard = self.shard_of[name]
        if shard != self.current:
            self._open(shard)
        self.handle.write(_as_bytes(tensor))
        self.position += 1

    def _open(self, shard: int) -> None:
        if self.handle:
            self.handle.close()
        self.current = shard
        header, offset = {}, 0
        for info in self.shards[shard]:
            header[info.name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        self.handle = open(self.directory / self.files[shard], "wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def close(self) -> None:
        if self.position != len(self.expected):
            raise ValueError(f"only {self.position} of {len(self.expected)} planned tensors were written")
        if self.handle:
            self.handle.close()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(info.nbytes for info in self.expected)},
                "weight_map": {info.name: self.files[self.shard_of[info.name]] for info in self.expected},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# The files of a Hugging Face model folder besides its weights: config, generation config, tokenizer.
MODEL_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*"
    r"|merges\.txt|chat_template\.(jinja|json)|.*\.model|preprocessor_config\.json)$"
)


def later_names(named: Iterable[tuple[str, object]]) -> set[str]:
    """Of (name, identity) pairs, the names whose identity came under an earlier name: a tied lm_head after the input
    embedding it shares. They are dropped from what is saved, as save_pretrained drops them."""
    seen, later = set(), set()
    for name, identity in named:
        if identity in seen:
            later.add(name)
        seen.add(identity)
    return later


def copy_model_files(source: Path, destination: Path) -> None:
    """Copy config, generation config and tokenizer files (not weights, optimizer or training state)."""
    for file in sorted(source.iterdir()):
        if file.is_file() and MODEL_FILES.match(file.name):
            shutil.copy2(file, destination / file.name)
