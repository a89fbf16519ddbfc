"""Reading DeepSpeed and FSDP checkpoints without running code from them.

A `.pt` file is a pickle, and unpickling can run any code the file names. DeepSpeed's zero_to_fp32
loads its `*_states.pt` with `torch.load(weights_only=False)`, and torch's distributed-checkpoint
reader unpickles FSDP's `.metadata` (and loads byte entries with weights_only=False). Here zero_to_fp32's every
torch.load is weights-only with exactly the extra types ZeRO checkpoints hold, and
`.metadata` is checked by an unpickler that resolves only the names FSDP metadata uses (both lists
read off real ZeRO-2/3 and FSDP checkpoints); anything else is refused in one line naming the file.
Enum members are pickled by value on some Python patch levels and as `builtins.getattr(EnumClass, name)` on
others (Debian's 3.11.2): the getattr form is allowed only on an allowed enum class with one of its member names.
`--trust_checkpoint` lifts the check for files the user trusts. Can go when DeepSpeed and
torch.distributed.checkpoint load with weights_only themselves.
"""

import contextlib
import enum
import importlib
import pickle
import unittest.mock
from pathlib import Path

import torch

from instructune.errors import UserError

# (module, name) that FSDP's .metadata pickle may name: its dataclasses, torch.Size, a dtype, a path.
METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


def member_getattr(allowed: set):
    """A stand-in for `builtins.getattr` while unpickling: only `getattr(EnumClass, member_name)` for an enum class
    in `allowed`; any other use is refused."""

    def getattr_member(owner, name):
        if isinstance(owner, enum.EnumMeta) and owner in allowed and isinstance(name, str) and name in owner.__members__:
            return owner[name]
        raise _Refused(f"names builtins.getattr({getattr(owner, '__name__', type(owner).__name__)}, {name!r})")

    return getattr_member


def _zero_types() -> list:
    """The types that ZeRO-2/3 `*_states.pt` files hold besides tensors and plain containers (and getattr, for the
    enum among them)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address, (member_getattr({ZeroStageEnum}), "builtins.getattr")]


def refusal(file, reason: str) -> UserError:
    return UserError(f"{file}: holds objects other than plain weights ({reason[:200]}); not loaded, since "
                     "unpickling can run code: pass --trust_checkpoint if you trust this file")


class _WeightsOnlyTorch:
    """`torch` as DeepSpeed's zero_to_fp32 module sees it within weights_only_loading: the same module, but its
    `load` is weights-only with the allow-list."""

    def __init__(self, checkpoint: Path):
        self._checkpoint = checkpoint

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def load(self, file, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_zero_types()):
                return torch.load(file, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise refusal(file if isinstance(file, (str, Path)) else self._checkpoint,
                          str(e).splitlines()[0]) from None


# The modules whose torch.load calls unpickle a checkpoint with weights_only=False (DeepSpeed's ZeRO converter;
# torch's distributed-checkpoint reader for FSDP's byte entries), read off DeepSpeed 0.19 and torch 2.13.
# tests/faults/test_enum_pickles.py fails in one line if one of them no longer does.
UNPICKLING_MODULES = ("deepspeed.utils.zero_to_fp32", "torch.distributed.checkpoint.default_planner",
                      "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint.format_utils")


@contextlib.contextmanager
def weights_only_loading(checkpoint: Path, trust: bool = False):
    """Within the block, the UNPICKLING_MODULES load weights-only with the allow-list. Scoped to them (their name
    `torch` is swapped, not torch.load itself): the rest of the process, other threads included, loads as before."""
    if trust:
        yield
        return
    with contextlib.ExitStack() as stack:
        for name in UNPICKLING_MODULES:
            stack.enter_context(unittest.mock.patch.object(importlib.import_module(name), "torch",
                                                           _WeightsOnlyTorch(checkpoint)))
        yield


class _Refused(pickle.UnpicklingError):
    """A name outside the allow-list (as opposed to a damaged pickle)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("builtins", "getattr"):
            return member_getattr({_metadata_enum()})
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in METADATA_GLOBALS and not is_dtype:
            raise _Refused(f"names {module}.{name}")
        return super().find_class(module, name)


def _metadata_enum() -> type:
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    return _MEM_FORMAT_ENCODING


def check_metadata(path: Path, trust: bool = False) -> None:
    """FSDP's .metadata pickle names only what such metadata holds; checked before torch unpickles it."""
    if trust:
        return
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); the checkpoint is incomplete") from None
    except _Refused as e:
        raise refusal(path, str(e)) from None
    except (pickle.UnpicklingError, EOFError, ValueError):
        raise UserError(f"{path}: truncated or damaged; the checkpoint is incomplete") from None
