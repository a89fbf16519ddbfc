"""ZeRO and FSDP checkpoints convert on every Python (#20 §1): an enum member is pickled by value on one patch level
and as `builtins.getattr(EnumClass, name)` on another (Debian's 3.11.2). Both shapes are written here explicitly, so
the allow-lists are tested whatever interpreter runs the suite; any other getattr stays refused."""

import enum
import io
import pathlib
import pickle
import types

import pytest
import torch
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import zero_to_fp32
from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

from instructune.checkpoint.safeload import UNPICKLING_MODULES, check_metadata, weights_only_loading
from instructune.errors import UserError


def pickler_module(shape: str):
    """A pickle module for torch.save whose enums take `shape`: 'value' (cls(value)) or 'getattr' (getattr(cls, name))."""

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, enum.Enum):
                return (getattr, (type(obj), obj.name)) if shape == "getattr" else (type(obj), (obj.value,))
            return NotImplemented

    return types.SimpleNamespace(Pickler=Pickler, __name__="pickle")


class Attribute:
    """Pickled as getattr(owner, name): the shape of an attack through getattr."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def saved(obj, path, shape: str = "value"):
    torch.save(obj, path, pickle_module=pickler_module(shape))
    return path


@pytest.mark.parametrize("shape", ["value", "getattr"])
def test_zero_optimizer_states_with_either_enum_shape_load(tmp_path, shape):
    path = saved({"zero_stage": ZeroStageEnum.gradients, "state": torch.ones(3)}, tmp_path / "optim_states.pt", shape)
    assert (b"getattr" in path.read_bytes()) == (shape == "getattr")  # the shape really is the one under test
    with weights_only_loading(tmp_path):
        loaded = zero_to_fp32.torch.load(path)  # the load DeepSpeed's converter makes
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and torch.equal(loaded["state"], torch.ones(3))


@pytest.mark.parametrize("owner, name", [(ZeroStageEnum, "__class__"), (ZeroStageEnum, "_missing_"),
                                         (pathlib.PosixPath, "unlink")])
def test_any_other_getattr_is_refused(tmp_path, owner, name):
    path = saved({"x": Attribute(owner, name)}, tmp_path / "optim_states.pt")
    with weights_only_loading(tmp_path), pytest.raises(UserError, match="holds objects other than plain weights"):
        zero_to_fp32.torch.load(path)


@pytest.mark.parametrize("shape", ["value", "getattr"])
def test_fsdp_metadata_with_either_enum_shape_is_accepted(tmp_path, shape):
    buffer = io.BytesIO()
    pickler_module(shape).Pickler(buffer, protocol=4).dump({"format": _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT,
                                                            "size": torch.Size([2, 3])})
    (tmp_path / ".metadata").write_bytes(buffer.getvalue())
    assert (b"getattr" in buffer.getvalue()) == (shape == "getattr")
    check_metadata(tmp_path / ".metadata")


@pytest.mark.parametrize("owner, name", [(_MEM_FORMAT_ENCODING, "__new__"), (pathlib.PosixPath, "unlink")])
def test_fsdp_metadata_with_another_getattr_is_refused(tmp_path, owner, name):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"x": Attribute(owner, name)}, protocol=4))
    with pytest.raises(UserError, match=r"holds objects other than plain weights \(names builtins.getattr"):
        check_metadata(tmp_path / ".metadata")


def test_the_weights_only_loading_is_scoped_to_the_modules_that_unpickle(tmp_path):
    """Each module named still calls torch.load (a library that moved it would otherwise go unguarded), and within
    the block the rest of the process loads as before (torch.load itself is not replaced)."""
    import importlib
    import inspect

    for name in UNPICKLING_MODULES:
        assert "torch.load(" in inspect.getsource(importlib.import_module(name)), f"{name} no longer calls torch.load"
    path = saved({"x": Attribute(pathlib.PosixPath, "cwd")}, tmp_path / "other.pt")
    with weights_only_loading(tmp_path):
        assert torch.load(path, weights_only=False)["x"] == pathlib.PosixPath.cwd  # not ours to restrict
        with pytest.raises(UserError):
            zero_to_fp32.torch.load(path)
