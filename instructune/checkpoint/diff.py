"""Weight diffs: publish `tuned − raw` instead of the tuned weights, recover the tuned model from a copy
of the raw one. Tensor by tensor, so memory stays near the largest tensor whatever the model size.

A diff folder is a Hugging Face model folder (the tuned config and tokenizer, one diff tensor per
weight) plus `weight_diff.json`, a manifest with the SHA-256 of every raw tensor, of every recovered
one and of every other file it ships (config, tokenizer): a wrong base is refused before anything is
written, a damaged diff is named, and nothing unverified reaches the recovered folder. The manifest
and the shard index are validated, a diff folder holds plain files only (no links), and every name
they give stays inside it.

Encodings:
- "float" (default): `tuned − raw` in fp32, Stanford Alpaca's released format. Rows that the tuned
  model added to the vocabulary are diffed against the mean of the raw rows, which is exactly what
  Alpaca's script does after giving the raw LLaMA its '[PAD]' token. Recovery is `raw + diff`,
  with a float round-off that make_diff measures and reports.
- "exact": the XOR of the raw and tuned bit patterns (raw cast to the tuned dtype, added rows
  against zeros): recovery is bitwise identical to the tuned model.
Alpaca's own diff folders (no manifest) are recovered the way Alpaca's weight_diff.py does.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from instructune.checkpoint.tensorio import (
    DTYPES,
    MODEL_FILES,
    ShardWriter,
    TensorFolder,
    copy_model_files,
    inside,
    tensor_sha256,
)
from instructune.errors import UserError
from instructune.files import atomic_folder

logger = logging.getLogger("instructune")

MANIFEST = "weight_diff.json"
FORMAT, VERSION = "instructune-weight-diff", 2
ENTRY_FIELDS = {"raw_shape": list, "raw_sha256": str, "dtype": str, "added_rows": int, "diff_sha256": str,
                "recovered_sha256": str}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
ALPACA_7B_SUM = 50637.1836  # Alpaca's hard-coded sum of its recovered 7B weights


@dataclass
class DiffReport:
    tensors: int
    bytes: int
    max_abs_error: float  # recovered vs tuned, as measured by make_diff (0 for exact diffs)
    weight_sum: float | None = None

    def summary(self) -> str:
        text = f"{self.tensors} tensors, {self.bytes / 1e6:.1f} MB, max abs error vs the tuned weights {self.max_abs_error:.3g}"
        return text + (f", sum of weights {self.weight_sum:.4f}" if self.weight_sum is not None else "")


def make_diff(path_raw, path_tuned, path_diff, exact: bool = False, dtype: str = "fp32",
              max_shard_size: str = "2GB", device: str = "cpu") -> DiffReport:
    raw, tuned = TensorFolder(path_raw), TensorFolder(path_tuned)
    _check_same_architecture(raw.path, tuned.path)
    encoding = "exact" if exact else "float"
    diff_dtype = DTYPES[dtype]
    names = tuned.names()
    for name in names:
        _base_rows(raw, name, tuned.tensors[name].shape)  # refuse mismatches before writing anything
    plan = [(n, tuned.tensors[n].shape, BITS[tuned.tensors[n].dtype] if exact else diff_dtype) for n in names]

    _require_config(tuned.path)
    manifest = {"format": FORMAT, "version": VERSION, "encoding": encoding,
                "model_type": _model_type(tuned.path), "tensors": {}}
    max_error, total = 0.0, 0
    with atomic_folder(Path(path_diff)) as staging:
        writer = ShardWriter(staging, plan, max_shard_size)
        for name in tqdm(names, desc="make_diff", unit="tensor"):
            raw_tensor, tuned_tensor = raw.get(name), tuned.get(name).to(device)
            entry = {"raw_shape": list(raw_tensor.shape), "raw_dtype": _dtype_name(raw_tensor.dtype),
                     "raw_sha256": tensor_sha256(raw_tensor), "dtype": _dtype_name(tuned_tensor.dtype)}
            added = tuned_tensor.shape[0] - raw_tensor.shape[0] if tuned_tensor.ndim else 0
            # At most four copies of the tensor alive at once: raw, tuned, diff, recovered.
            if exact:
                base = _extend_rows(raw_tensor.to(device, tuned_tensor.dtype), added, mean=False)
                diff = _bits(tuned_tensor) ^ _bits(base)
                recovered_sha256, error = tensor_sha256(tuned_tensor.cpu()), 0.0
            else:
                base = _extend_rows(raw_tensor.to(device, torch.float32), added, mean=True)
                diff = (tuned_tensor.to(torch.float32) - base).to(diff_dtype)
                recovered = base + diff.to(torch.float32)
                recovered_sha256 = tensor_sha256(recovered.to(tuned_tensor.dtype).cpu())
                error = recovered.sub_(tuned_tensor).abs_().max().item() if recovered.numel() else 0.0
            del raw_tensor, base
            diff = diff.cpu()
            writer.write(name, diff)
            entry.update(added_rows=added, diff_sha256=tensor_sha256(diff), recovered_sha256=recovered_sha256,
                         max_abs_error=error)
            manifest["tensors"][name] = entry
            max_error, total = max(max_error, error), total + diff.numel() * diff.element_size()
        writer.close()
        manifest["max_abs_error"] = max_error
        copy_model_files(tuned.path, staging)
        manifest["files"] = {f.name: _file_sha256(f) for f in sorted(staging.iterdir()) if MODEL_FILES.match(f.name)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return DiffReport(len(names), total, max_error)


def recover(path_raw, path_diff, path_tuned=None, device: str = "cpu", expected_sum: float | None = None) -> DiffReport:
    """Rebuild the tuned model into `path_tuned` (or only check, without it); all checks pass before it appears."""
    _refuse_links(Path(path_diff))
    raw, diff = TensorFolder(path_raw), TensorFolder(path_diff)
    _require_config(diff.path)
    _check_same_architecture(raw.path, diff.path)
    manifest = _read_manifest(diff.path / MANIFEST)
    names = diff.names()
    if manifest is None:
        _accept_without_manifest(diff)
    entries = manifest["tensors"] if manifest else {}
    if manifest and set(entries) != set(names):
        missing = sorted(set(entries) ^ set(names))[0]
        raise UserError(f"{diff.path}: the diff and its manifest disagree on tensor {missing}")
    _check_base(raw, diff, names, entries)

    def recovered_dtype(name):
        return getattr(torch, entries[name]["dtype"]) if manifest else torch.float32  # Alpaca recovers fp32

    plan = [(n, diff.tensors[n].shape, recovered_dtype(n)) for n in names]
    exact = bool(manifest) and manifest["encoding"] == "exact"
    weight_sum, total = torch.zeros((), dtype=torch.float32), 0
    with atomic_folder(Path(path_tuned) if path_tuned else None) as staging:
        writer = ShardWriter(staging, plan, "2GB") if staging else None
        for name in tqdm(names, desc="recover", unit="tensor"):
            delta = diff.get(name)
            if manifest and tensor_sha256(delta) != entries[name]["diff_sha256"]:
                raise UserError(f"{diff.tensors[name].file}: damaged diff shard (tensor {name} does not match its checksum)")
            raw_tensor = raw.get(name).to(device)
            added = delta.shape[0] - raw_tensor.shape[0] if delta.ndim else 0
            if exact:
                base = _extend_rows(raw_tensor.to(recovered_dtype(name)), added, mean=False)
                result = (_bits(delta.to(device)) ^ _bits(base)).view(recovered_dtype(name))
            else:
                base = _extend_rows(raw_tensor.to(torch.float32), added, mean=True)
                result = (delta.to(device, torch.float32) + base).to(recovered_dtype(name))
            result = result.cpu()
            if manifest and tensor_sha256(result) != entries[name]["recovered_sha256"]:
                raise UserError(f"tensor {name}: the recovered weights do not match the manifest")
            weight_sum += result.to(torch.float32).sum()
            total += result.numel() * result.element_size()
            if writer:
                writer.write(name, result)
        if expected_sum is not None and abs(weight_sum.item() - expected_sum) > 1e-2:
            raise UserError(
                f"naive integrity check failed: the recovered weights sum to {weight_sum.item():.4f}, expected "
                f"{expected_sum:.4f} (the per-tensor checks of an instructune diff name the culprit instead)"
            )
        if writer:
            writer.close()
            copy_model_files(diff.path, staging)
            if manifest:
                _verify_files(staging, manifest["files"], diff.path)
    return DiffReport(len(names), total, manifest["max_abs_error"] if manifest else float("nan"), weight_sum.item())


def _require_config(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json (a model or diff folder needs one)")


def _refuse_links(folder: Path) -> None:
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_symlink():
            raise UserError(f"{path}: a symbolic link; a diff folder holds plain files only")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict | None:
    """The validated manifest, or None if the diff has none (Alpaca's own diffs)."""
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    def bad(what: str):
        return UserError(f"{path}: {what}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"not an instructune weight-diff manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise bad(f"manifest version {manifest.get('version')!r}; this instructune reads version {VERSION}")
    if manifest.get("encoding") not in ("float", "exact"):
        raise bad(f"encoding {manifest.get('encoding')!r}; expected 'float' or 'exact'")
    if not isinstance(manifest.get("max_abs_error"), (int, float)):
        raise bad("'max_abs_error' must be a number")
    tensors, files = manifest.get("tensors"), manifest.get("files")
    if not isinstance(tensors, dict) or not tensors:
        raise bad("'tensors' must map tensor names to their entries")
    for name, entry in tensors.items():
        for field, kind in ENTRY_FIELDS.items():
            if not isinstance(entry, dict) or not isinstance(entry.get(field), kind):
                raise bad(f"tensor {name}: field {field!r} must be a {kind.__name__}")
        if not hasattr(torch, entry["dtype"]) or not isinstance(getattr(torch, entry["dtype"]), torch.dtype):
            raise bad(f"tensor {name}: unknown dtype {entry['dtype']!r}")
    if not isinstance(files, dict) or "config.json" not in files or not all(isinstance(v, str) for v in files.values()):
        raise bad("'files' must map every shipped file (config.json included) to its SHA-256")
    for name in files:
        inside(path.parent, name, path)
    return manifest


def _accept_without_manifest(diff: TensorFolder) -> None:
    integer = next((n for n, i in diff.tensors.items() if not i.dtype.is_floating_point), None)
    if integer:
        raise UserError(f"{diff.path}: no {MANIFEST}, and tensor {integer} is an integer (exact) diff, which cannot "
                        "be recovered or checked without its manifest")
    logger.warning("%s: no %s, so nothing can be verified (an Alpaca-format diff); pass --expected_sum to check "
                   "the sum of the recovered weights", diff.path, MANIFEST)


def _verify_files(staging: Path, expected: dict[str, str], source: Path) -> None:
    """Every file copied into the recovered folder is one the manifest lists, with its checksum, and none is missing."""
    copied = {f.name for f in staging.iterdir() if MODEL_FILES.match(f.name)}
    for name in sorted(copied | set(expected)):
        if name not in expected:
            raise UserError(f"{source / name}: not listed in {MANIFEST}; refusing to ship an unverified file")
        if name not in copied:
            raise UserError(f"{source / name}: listed in {MANIFEST} but missing")
        if _file_sha256(staging / name) != expected[name]:
            raise UserError(f"{source / name}: does not match its checksum in {MANIFEST}")


def _check_base(raw: TensorFolder, diff: TensorFolder, names: list[str], entries: dict) -> None:
    """Refuse a wrong or damaged base model before anything is written."""
    for name in tqdm(names, desc="checking the base model", unit="tensor"):
        _base_rows(raw, name, diff.tensors[name].shape)
        if entries:
            entry = entries[name]
            if list(raw.tensors[name].shape) != entry["raw_shape"] or tensor_sha256(raw.get(name)) != entry["raw_sha256"]:
                raise UserError(f"tensor {name}: base does not match (is {raw.path} the model the diff was made from?)")


def _base_rows(raw: TensorFolder, name: str, shape: tuple[int, ...]) -> None:
    if name not in raw.tensors:
        raise UserError(f"tensor {name}: missing from the base model {raw.path}")
    raw_shape = raw.tensors[name].shape
    grows_rows = len(raw_shape) == len(shape) and raw_shape[1:] == shape[1:] and raw_shape[:1] <= shape[:1]
    if not grows_rows:
        raise UserError(f"tensor {name}: shape {list(raw_shape)} in the base model, {list(shape)} in the other")


def _extend_rows(tensor: torch.Tensor, added: int, mean: bool) -> torch.Tensor:
    """Rows the tuned vocabulary added: the mean of the old rows (Alpaca's initialisation) or zeros."""
    if added <= 0:
        return tensor
    extra = tensor.mean(dim=0, keepdim=True).expand(added, *tensor.shape[1:]) if mean else tensor.new_zeros(added, *tensor.shape[1:])
    return torch.cat([tensor, extra])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(BITS.get(tensor.dtype, tensor.dtype))


def _model_type(path: Path) -> str | None:
    config = path / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.exists() else None


def _check_same_architecture(raw: Path, other: Path) -> None:
    raw_type, other_type = _model_type(raw), _model_type(other)
    if raw_type and other_type and raw_type != other_type:
        raise UserError(f"mismatched architectures: {raw} is {raw_type!r}, {other} is {other_type!r}")
