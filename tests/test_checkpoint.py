"""edge_ds.checkpoint against files written by the safetensors package and hand-made bad files."""

from __future__ import annotations

import json
import os
import random
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save
from safetensors.torch import save_file as torch_save

from edge_ds.checkpoint import Checkpoint, SafetensorsFile, TensorNotFoundError, numpy_dtype
from edge_ds.errors import EdgeDSError

# --- helpers -----------------------------------------------------------------------


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a safetensors-shaped file by hand (header JSON or raw header bytes, then data)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def expect_error(path: Path, *fragments: str) -> EdgeDSError:
    with pytest.raises(EdgeDSError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert path.name in msg and "\n" not in msg
    for f in fragments:
        assert f in msg
    return e.value


# --- round trips -------------------------------------------------------------------

NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}


def random_array(dtype, shape, rng) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def test_numpy_dtypes_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {code: random_array(dt, (3, 5, 2), rng) for code, dt in NUMPY_DTYPES.items()}
    arrays["scalar"] = np.array(7.5, np.float32)
    arrays["empty"] = np.zeros((0, 4), np.float32)
    path = tmp_path / "m.safetensors"
    np_save(arrays, str(path), metadata={"format": "np"})

    f = SafetensorsFile(path)
    assert f.metadata == {"format": "np"}
    assert set(f.tensors) == set(arrays)
    for code, dt in NUMPY_DTYPES.items():
        assert f.tensors[code].dtype == code
        assert numpy_dtype(code) == np.dtype(dt)
    for name, want in arrays.items():
        got = f.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
        assert got.flags.writeable and got.flags.c_contiguous
        got[...] = 0  # writable, and does not alias anything shared
    assert f.read("U8").tobytes() == arrays["U8"].tobytes()
    f.close()


@pytest.mark.parametrize(
    "torch_dtype, code, np_dtype, int_view",
    [
        (torch.bfloat16, "BF16", ml_dtypes.bfloat16, torch.int16),
        (torch.float8_e4m3fn, "F8_E4M3", ml_dtypes.float8_e4m3fn, torch.uint8),
        (torch.float8_e5m2, "F8_E5M2", ml_dtypes.float8_e5m2, torch.uint8),
    ],
)
def test_torch_dtypes_bit_exact(tmp_path, torch_dtype, code, np_dtype, int_view):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(37, 130, generator=g) * 50).to(torch_dtype)
    path = tmp_path / "t.safetensors"
    torch_save({"w": t, "pad": torch.ones(3)}, str(path))

    f = SafetensorsFile(path)
    assert f.tensors["w"].dtype == code
    got = f.read("w")
    assert got.dtype == np.dtype(np_dtype) and got.shape == (37, 130)
    want_bits = t.view(int_view).numpy()
    assert np.array_equal(got.view(want_bits.dtype), want_bits)
    # values agree too (NaN-free data), so downstream casts see the same numbers
    np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


def test_absolute_offsets_point_at_the_data(tmp_path):
    arrays = {"a": np.arange(10, dtype=np.int32), "b": np.full((4, 4), 2.5, np.float64), "c": np.ones(3, np.uint8)}
    path = tmp_path / "m.safetensors"
    np_save(arrays, str(path))
    f = SafetensorsFile(path)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    blob = path.read_bytes()
    for name, a in arrays.items():
        info = f.tensors[name]
        assert info.path == path and info.name == name
        assert info.nbytes == a.nbytes and info.shape == a.shape
        assert info.offset >= 8 + header_len
        assert blob[info.offset : info.offset + info.nbytes] == a.tobytes()


def test_numpy_dtype_unknown():
    assert numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16)
    assert numpy_dtype("F8_E4M3") == np.dtype(ml_dtypes.float8_e4m3fn)
    with pytest.raises(EdgeDSError, match="F7"):
        numpy_dtype("F7")


# --- checkpoints -------------------------------------------------------------------


def write_sharded(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = {
        "model.embed.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "model.layers.0.w": np.full((2, 2), 3.0, np.float32),
        "model.layers.1.w": np.arange(6, dtype=np.int64),
        "model.layers.1.w_scale_inv": np.array([[0.5]], np.float32),
    }
    shards = {
        "model-00001-of-00002.safetensors": ["model.embed.weight", "model.layers.0.w"],
        "model-00002-of-00002.safetensors": ["model.layers.1.w", "model.layers.1.w_scale_inv"],
    }
    weight_map = {}
    for shard, names in shards.items():
        np_save({n: arrays[n] for n in names}, str(tmp_path / shard))
        weight_map.update({n: shard for n in names})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
    )
    return tmp_path, arrays


def test_sharded_index(tmp_path):
    d, arrays = write_sharded(tmp_path)
    # a stray file the index does not name is ignored
    np_save({"stray": np.zeros(1, np.float32)}, str(d / "consolidated.safetensors"))
    ckpt = Checkpoint(d)
    assert ckpt.names() == sorted(arrays)
    assert "model.layers.1.w" in ckpt and "stray" not in ckpt and 5 not in ckpt
    info = ckpt.info("model.layers.1.w")
    assert info.path == d / "model-00002-of-00002.safetensors"
    np.testing.assert_array_equal(ckpt.read("model.layers.1.w"), arrays["model.layers.1.w"])
    np.testing.assert_array_equal(ckpt.read("model.embed.weight"), arrays["model.embed.weight"])
    assert ckpt.files() == [d / "model-00001-of-00002.safetensors", d / "model-00002-of-00002.safetensors"]
    assert ckpt.total_bytes() == sum(a.nbytes for a in arrays.values())
    ckpt.close()


def test_missing_shard(tmp_path):
    d, _ = write_sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EdgeDSError) as e:
        Checkpoint(d)
    assert "model-00002-of-00002.safetensors" in str(e.value)
    assert "model.safetensors.index.json" in str(e.value)


def test_index_points_at_wrong_shard(tmp_path):
    d, _ = write_sharded(tmp_path)
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.1.w"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(EdgeDSError) as e:
        Checkpoint(d)
    assert "model-00001-of-00002.safetensors" in str(e.value) and "model.layers.1.w" in str(e.value)


def test_bad_index_json(tmp_path):
    d, _ = write_sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(EdgeDSError, match="model.safetensors.index.json"):
        Checkpoint(d)


def test_unindexed_directory_and_missing_tensor(tmp_path):
    np_save({"b": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
    np_save({"a": np.zeros(3, np.float16)}, str(tmp_path / "a.safetensors"))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.names() == ["a", "b"]
    assert ckpt.files() == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    assert ckpt.read("a").dtype == np.float16
    with pytest.raises(TensorNotFoundError) as e:
        ckpt.info("nope")
    assert "nope" in str(e.value) and str(tmp_path) in str(e.value)
    assert isinstance(e.value, KeyError) and isinstance(e.value, EdgeDSError)
    with pytest.raises(KeyError):
        ckpt.read("nope")


def test_duplicate_tensor_across_files(tmp_path):
    np_save({"x": np.ones(2, np.float32)}, str(tmp_path / "a.safetensors"))
    np_save({"x": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(EdgeDSError) as e:
        Checkpoint(tmp_path)
    assert "'x'" in str(e.value) and "a.safetensors" in str(e.value) and "b.safetensors" in str(e.value)


def test_empty_directory(tmp_path):
    with pytest.raises(EdgeDSError, match=str(tmp_path)):
        Checkpoint(tmp_path)
    with pytest.raises(EdgeDSError, match="not a directory"):
        Checkpoint(tmp_path / "missing")


# --- corrupt files -----------------------------------------------------------------


def test_truncated_file_caught_at_open(tmp_path):
    path = tmp_path / "cut.safetensors"
    np_save({"a": np.ones(100, np.float32), "b": np.ones(50, np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-5])
    expect_error(path, "truncated")


def test_too_short_for_length_prefix(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    expect_error(tmp_path / "empty.safetensors", "0 bytes")
    (tmp_path / "t2.safetensors").write_bytes(b"\x01\x02\x03")
    expect_error(tmp_path / "t2.safetensors", "3 bytes")


def test_absurd_header_length(tmp_path):
    expect_error(write_raw(tmp_path / "huge.safetensors", {}, header_len=2**62), "implausible")


def test_header_longer_than_file(tmp_path):
    expect_error(write_raw(tmp_path / "long.safetensors", {}, header_len=1000), "exceeds file size")


@pytest.mark.parametrize(
    "header, fragment",
    [
        (b"\xff\xfe not utf-8", "not valid JSON"),
        (b"{this is not json}", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate"),
        ({"a": {"dtype": "F32", "shape": [1]}}, "needs dtype, shape and data_offsets"),
        ({"a": [1, 2, 3]}, "needs dtype"),
        ({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}}, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12"),  # size/shape mismatch
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "ends at data byte 24"),  # out of range
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            "overlapping",
        ),
        ({"__metadata__": {"k": 1}}, "__metadata__"),
    ],
)
def test_bad_headers(tmp_path, header, fragment):
    path = write_raw(tmp_path / "bad.safetensors", header, b"\0" * 16)
    expect_error(path, fragment)


def test_good_hand_written_header_with_gap_and_zero_size(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes() + b"\xaa" * 4 + np.arange(2, dtype=np.int16).tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]},  # empty, inside a's range: fine
        "b": {"dtype": "I16", "shape": [2], "data_offsets": [20, 24]},
    }
    f = SafetensorsFile(write_raw(tmp_path / "ok.safetensors", header, data))
    np.testing.assert_array_equal(f.read("a"), np.arange(4, dtype=np.float32).reshape(2, 2))
    np.testing.assert_array_equal(f.read("b"), [0, 1])
    assert f.read("z").shape == (0, 3)


def test_short_read_after_open(tmp_path):
    path = tmp_path / "shrinks.safetensors"
    np_save({"a": np.ones(64, np.float32), "b": np.ones(64, np.float32)}, str(path))
    f = SafetensorsFile(path)
    os.truncate(path, path.stat().st_size - 10)
    last = max(f.tensors.values(), key=lambda i: i.offset).name
    with pytest.raises(EdgeDSError) as e:
        f.read(last)
    assert path.name in str(e.value) and repr(last) in str(e.value)
    f.close()


def test_missing_tensor_in_file(tmp_path):
    path = tmp_path / "m.safetensors"
    np_save({"a": np.ones(2, np.float32)}, str(path))
    with SafetensorsFile(path) as f, pytest.raises(TensorNotFoundError, match="m.safetensors"):
        f.read("b")


# --- concurrency -------------------------------------------------------------------


def test_concurrent_reads(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {f"t{i}": rng.standard_normal(int(rng.integers(1, 5000))).astype(np.float32) for i in range(40)}
    path = tmp_path / "many.safetensors"
    np_save(arrays, str(path))
    f = SafetensorsFile(path)  # one shared instance and one shared fd

    def worker(seed: int) -> bool:
        names = list(arrays) * 3
        random.Random(seed).shuffle(names)
        return all(np.array_equal(f.read(n), arrays[n]) for n in names)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(worker, range(8)))
    f.close()
    assert np.array_equal(f.read("t0"), arrays["t0"])  # reopens lazily after close
    f.close()
