"""GGUF reader: metadata and tensors round-trip through gguf.GGUFWriter; damaged files
give one readable error each."""
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from mistralrs_quant.formats import quantize
from mistralrs_quant.gguf_reader import open_gguf
from gguf_convert import gguf_tensor_record, patch_bytes

METADATA = {
    "t.u8": ("uint8", 200), "t.i8": ("int8", -100), "t.u16": ("uint16", 60000), "t.i16": ("int16", -30000),
    "t.u32": ("uint32", 4_000_000_000), "t.i32": ("int32", -2_000_000_000), "t.f32": ("float32", 0.25),
    "t.u64": ("uint64", 2**63 + 5), "t.i64": ("int64", -(2**62)), "t.f64": ("float64", 1e-300),
    "t.bool": ("bool", True), "t.str": ("string", "héllo ▁ wörld 🙂"),
}


def write_gguf(path, tensors=None, arch="llama", endianess=gguf.GGUFEndian.LITTLE, extra=None):
    w = gguf.GGUFWriter(str(path), arch, endianess=endianess)
    for key, (kind, value) in METADATA.items():
        getattr(w, f"add_{kind}")(key, value)
    w.add_array("t.arr_i", [1, -2, 3])
    w.add_array("t.arr_f", [0.5, 1.5])
    w.add_array("t.arr_s", ["a", "▁b", ""])
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    for name, (array, qtype) in (tensors or {}).items():
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def small_tensors(rng):
    w = rng.standard_normal((48, 64)).astype(np.float32)
    return {
        "w.f32": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "w.f16": (rng.standard_normal((7,)).astype(np.float16), None),
        "w.q8_0": (quantize(torch.from_numpy(w), T.Q8_0).numpy(), T.Q8_0),
        "w.q4_k": (quantize(torch.from_numpy(rng.standard_normal((2, 4, 256)).astype(np.float32)), T.Q4_K).numpy(),
                   T.Q4_K),
    }


@pytest.fixture
def small_file(tmp_path, small_tensors):
    return write_gguf(tmp_path / "small.gguf", small_tensors)


def test_metadata_and_tensors(small_file, small_tensors):
    g = open_gguf(small_file)
    assert g.architecture == "llama" and g.version == 3 and g.paths == [small_file]
    for key, (_, value) in METADATA.items():
        assert g.metadata[key] == pytest.approx(value) if isinstance(value, float) else g.metadata[key] == value
    assert g.metadata["t.arr_i"] == [1, -2, 3]
    assert g.metadata["t.arr_f"] == [0.5, 1.5]
    assert g.metadata["t.arr_s"] == ["a", "▁b", ""]
    assert set(g.tensors) == set(small_tensors)
    f32 = g.tensors["w.f32"]
    assert f32.shape == (3, 5) and f32.type_name == "F32" and f32.raw.dtype == np.uint8
    np.testing.assert_array_equal(f32.dequantize().numpy(), small_tensors["w.f32"][0])
    np.testing.assert_array_equal(g.tensors["w.f16"].dequantize().numpy(),
                                  small_tensors["w.f16"][0].astype(np.float32))
    q = g.tensors["w.q8_0"]
    assert q.shape == (48, 64) and q.raw.shape == (48, 68) and q.nbytes == 48 * 68
    np.testing.assert_array_equal(q.raw, small_tensors["w.q8_0"][0])
    k = g.tensors["w.q4_k"]
    assert k.shape == (2, 4, 256) and k.raw.shape == (2, 4, 144)
    np.testing.assert_array_equal(k.raw, small_tensors["w.q4_k"][0])


def test_matches_gguf_reader(small_file):
    ours = open_gguf(small_file)
    ref = gguf.GGUFReader(small_file)
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert int(mine.ggml_type) == int(t.tensor_type)
        np.testing.assert_array_equal(mine.raw.reshape(-1), t.data.view(np.uint8).reshape(-1))


def test_tensor_data_is_mapped_not_copied(small_file):
    g = open_gguf(small_file)
    raw = g.tensors["w.q8_0"].raw
    assert not raw.flags.owndata
    t = g.tensors["w.q8_0"].raw_tensor()
    t[0, 0] = 255 - int(t[0, 0])  # copy-on-write: the file itself is never modified
    assert raw[0, 0] == t[0, 0]
    assert open_gguf(small_file).tensors["w.q8_0"].raw[0, 0] != t[0, 0]


# ---------------------------------------------------------------- splits

def _write_splits(tmp_path, n_tensors=5, per_file=2):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama", split_max_tensors=per_file)
    w.add_uint32("x.y", 3)
    for i in range(n_tensors):
        w.add_tensor(f"t{i}", np.full((4, 8), i, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(tmp_path.glob("m-*.gguf"))


def test_split_files_load_as_one_model(tmp_path):
    files = _write_splits(tmp_path)
    assert len(files) == 3
    for given in (files, list(reversed(files)), files[0], files[1]):
        g = open_gguf(given)
        assert g.paths == files
        assert sorted(g.tensors) == [f"t{i}" for i in range(5)]
        assert g.metadata["x.y"] == 3 and g.metadata["split.count"] == 3 and g.metadata["split.no"] == 0
        assert g.tensors["t3"].dequantize().unique().tolist() == [3.0]
        assert g.tensors["t4"].file == files[2]


def test_split_errors(tmp_path):
    files = _write_splits(tmp_path)
    with pytest.raises(ValueError, match="split into 3 files, 2 given"):
        open_gguf(files[:2])
    files[2].unlink()
    with pytest.raises(FileNotFoundError, match="m-00003-of-00003.gguf"):
        open_gguf(files[0])
    renamed = files[0].with_name("model.gguf")
    files[0].rename(renamed)
    with pytest.raises(ValueError, match="pass all split files"):
        open_gguf(renamed)


def test_duplicate_tensor_across_splits(tmp_path):
    a = write_gguf(tmp_path / "a-00001-of-00002.gguf", {"x": (np.zeros(4, np.float32), None)},
                   extra={"split.no": 0, "split.count": 2})
    b = write_gguf(tmp_path / "a-00002-of-00002.gguf", {"x": (np.zeros(4, np.float32), None)},
                   extra={"split.no": 1, "split.count": 2})
    with pytest.raises(ValueError, match="'x' appears in both"):
        open_gguf([a, b])


# ---------------------------------------------------------------- damaged files

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        open_gguf(tmp_path / "nope.gguf")


def test_wrong_magic(small_file):
    patch_bytes(small_file, 0, b"GGML")
    with pytest.raises(ValueError, match=r"small\.gguf: not a GGUF file"):
        open_gguf(small_file)


def test_big_endian_file(tmp_path, small_tensors):
    path = write_gguf(tmp_path / "be.gguf", {"w.f32": small_tensors["w.f32"]}, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ValueError, match=r"be\.gguf: big-endian"):
        open_gguf(path)


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version(small_file, version):
    patch_bytes(small_file, 4, struct.pack("<I", version))
    with pytest.raises(ValueError, match=rf"small\.gguf: unsupported GGUF version {version}"):
        open_gguf(small_file)


@pytest.mark.parametrize("type_id, name", [(int(T.IQ2_XS), "IQ2_XS"), (int(T.I32), "I32"), (99, "unknown type 99")])
def test_unsupported_tensor_type(small_file, type_id, name):
    pos = gguf_tensor_record(small_file, b"w.q8_0")
    patch_bytes(small_file, pos + 4 + 2 * 8, struct.pack("<I", type_id))  # after n_dims, 2 dims
    with pytest.raises(ValueError, match=rf"small\.gguf: tensor 'w\.q8_0' has type {name}, which is not supported"):
        open_gguf(small_file)


def test_row_not_whole_blocks(small_file):
    pos = gguf_tensor_record(small_file, b"w.q8_0")
    patch_bytes(small_file, pos + 4, struct.pack("<Q", 40))
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        open_gguf(small_file)


def test_tensor_offset_out_of_range(small_file):
    pos = gguf_tensor_record(small_file, b"w.q8_0")
    patch_bytes(small_file, pos + 4 + 2 * 8 + 4, struct.pack("<Q", 1 << 40))
    with pytest.raises(ValueError, match=r"small\.gguf: tensor 'w\.q8_0' data .* extends past the end"):
        open_gguf(small_file)


def test_misaligned_tensor_offset(small_file):
    pos = gguf_tensor_record(small_file, b"w.q8_0")
    patch_bytes(small_file, pos + 4 + 2 * 8 + 4, struct.pack("<Q", 3))
    with pytest.raises(ValueError, match="not aligned"):
        open_gguf(small_file)


def test_truncated_tensor_data(small_file):
    data = small_file.read_bytes()
    small_file.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"small\.gguf: tensor '.*' data .* extends past the end .*truncated"):
        open_gguf(small_file)


@pytest.mark.parametrize("keep", [10, 30, 200, 400])
def test_truncated_header(small_file, keep):
    small_file.write_bytes(small_file.read_bytes()[:keep])
    with pytest.raises(ValueError, match=r"small\.gguf: truncated GGUF file"):
        open_gguf(small_file)


def test_corrupt_counts_and_types(small_file):
    original = small_file.read_bytes()
    patch_bytes(small_file, 8, struct.pack("<Q", 1 << 60))  # tensor count
    with pytest.raises(ValueError, match="truncated GGUF file"):
        open_gguf(small_file)
    small_file.write_bytes(original)
    key = b"t.u8"
    pos = original.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    patch_bytes(small_file, pos, struct.pack("<I", 77))  # value type
    with pytest.raises(ValueError, match=r"malformed GGUF file: metadata 't\.u8' has unknown value type 77"):
        open_gguf(small_file)


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        open_gguf(tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf: truncated"):
        open_gguf(empty)


# ---------------------------------------------------------------- real files

def test_real_models_open_fast(smollm2_path, gemma3_path):
    import time
    t0 = time.perf_counter()
    s = open_gguf(smollm2_path)
    g = open_gguf(gemma3_path)
    assert time.perf_counter() - t0 < 10
    assert s.architecture == "llama" and g.architecture == "gemma3"
    assert s.tensors["token_embd.weight"].shape == (49152, 576)
    assert g.tensors["token_embd.weight"].type_name == "Q8_0"
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 262144
    # spot-check dequantization of real tensors against gguf-py
    for f, name in ((s, "blk.0.ffn_down.weight"), (g, "blk.0.ffn_down.weight"), (g, "blk.0.attn_output.weight"),
                    (g, "blk.0.attn_q.weight")):
        info = f.tensors[name]
        rows = info.raw[:16]
        ref = gguf.quants.dequantize(np.ascontiguousarray(rows), T(info.ggml_type))
        np.testing.assert_array_equal(info.format.dequantize(torch.from_numpy(rows)).numpy(), ref)
