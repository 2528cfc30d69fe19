"""Fast GGUF loading: vectorised SentencePiece merges (exactly the reference's), their
disk cache (corrupt or unwritable caches fall back to computing), the header's string
arrays, and giving back mapped pages no tensor uses."""
import mmap
import random

import gguf
import numpy as np
import pytest
import torch

from mistralrs_quant import _spm_merges as S
from mistralrs_quant.gguf_reader import open_gguf
from mistralrs_quant.gguf_tokenizer import tokenizer_from_gguf

BYTE, NORMAL = 6, 1


def _vocab(pieces):
    out = {}
    for i, p in enumerate(pieces):
        out.setdefault(p, i)
    return out


def _random_vocab(seed, n=3000, alphabet="ab▁c🙂\x00\ud800é"):
    rnd = random.Random(seed)
    pieces = list(alphabet) + [f"<0x{b:02X}>" for b in range(8)]
    while len(pieces) < n:
        if rnd.random() < 0.7:  # mostly concatenations, so there are merges to find
            pieces.append(rnd.choice(pieces) + rnd.choice(pieces))
        else:
            pieces.append("".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 9))))
    pieces = pieces[:n]
    types = [BYTE if p.startswith("<0x") else NORMAL for p in pieces]
    return pieces, types


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ranking", ["position", "scores", "tied scores"])
def test_vectorised_merges_equal_reference(seed, ranking):
    pieces, types = _random_vocab(seed)
    vocab = _vocab(pieces)
    rnd = random.Random(seed)
    rank = {"position": None,
            "scores": [rnd.uniform(-50, 0) for _ in pieces],
            "tied scores": [float(rnd.randint(0, 5)) for _ in pieces]}[ranking]
    want = S.spm_merges_py(pieces, vocab, list(range(len(pieces))) if rank is None else rank, types)
    assert len(want) > 100  # duplicates, byte pieces, NUL, lone surrogates, astral characters
    assert S.spm_merges(pieces, vocab, rank, types) == want


def test_hash_collisions_fall_back_or_are_rejected(monkeypatch):
    # With base 1 a hash is the sum of (code point + 1): anagrams collide.
    monkeypatch.setattr(S, "_BASE", np.uint64(1))
    # Distinct piece hashes, but "bb" (a prefix of "bbz", not a piece) hashes like "ac".
    pieces, types = ["a", "b", "c", "z", "ac", "bbz", "bz"], [NORMAL] * 7
    vocab = _vocab(pieces)
    want = S.spm_merges_py(pieces, vocab, list(range(7)), types)
    assert ("ac", "z") not in want and S.spm_merges(pieces, vocab, None, types) == want
    # Two distinct pieces with one hash: the whole vocabulary goes to the reference.
    pieces = ["a", "b", "ab", "ba", "aba"]
    vocab = _vocab(pieces)
    assert S.spm_merges(pieces, vocab, None, [NORMAL] * 5) == \
        S.spm_merges_py(pieces, vocab, list(range(5)), [NORMAL] * 5)


def test_nan_scores_use_reference():
    pieces, types = _random_vocab(7, n=400)
    vocab = _vocab(pieces)
    rank = [float("nan") if i % 7 == 0 else float(i % 3) for i in range(len(pieces))]
    assert S.spm_merges(pieces, vocab, rank, types) == S.spm_merges_py(pieces, vocab, rank, types)


# ------------------------------------------------------------------------------ the cache

@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(S.CACHE_ENV_DISABLE, raising=False)
    monkeypatch.setattr(S, "CACHE_MIN_PIECES", 1)
    return tmp_path / "xdg" / "mistralrs" / "gguf_tokenizer"


TOK_ALPHABET = "ab▁c🙂\x00é"  # tokenizers' strings are UTF-8: no lone surrogates


def _spm_metadata(pieces, types, arch="gemma3"):
    return {"general.architecture": arch, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": [0.0] * len(pieces),
            "tokenizer.ggml.add_space_prefix": False}


TEXTS = ["ab▁c🙂 aé", "abcabc\x00ab", "🙂🙂é▁▁b", "bca cab abc", ""]


def _encode_all(tok):
    return [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]


def test_cache_written_then_used(cache_home, monkeypatch):
    pieces, types = _random_vocab(1, n=1500)
    vocab = _vocab(pieces)
    want = S.spm_merge_ids(pieces, vocab, None, types)
    cache_home.mkdir(parents=True)
    stale = cache_home / "spm-merges-0123.json"  # the first format's files go on a write
    stale.write_text("{}")
    got = S.cached_spm_merge_ids(pieces, vocab, None, types)  # miss: computed and written
    assert not stale.exists()
    files = list(cache_home.glob("spm-merges-*.bin"))
    assert len(files) == 1 and files[0].stat().st_size == S._HEADER.size + 8 * len(want[0])
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)

    def no_compute(*a, **k):
        raise AssertionError("the cache was not used")
    monkeypatch.setattr(S, "spm_merge_ids", no_compute)
    for a, b in zip(S.cached_spm_merge_ids(pieces, vocab, None, types), want):  # hit
        np.testing.assert_array_equal(a, b)
    # Other ranks are another key: computed again.
    with pytest.raises(AssertionError, match="not used"):
        S.cached_spm_merge_ids(pieces, vocab, [1.0] * len(pieces), types)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong ids", "out of range", "wrong header", "empty"])
def test_corrupt_cache_is_rebuilt(cache_home, damage):
    pieces, types = _random_vocab(2, n=1500, alphabet=TOK_ALPHABET)
    md = _spm_metadata(pieces, types)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(S.CACHE_ENV_DISABLE, "1")
        want = _encode_all(tokenizer_from_gguf(md)[0])
    tokenizer_from_gguf(md)
    (path,) = cache_home.glob("spm-merges-*.bin")
    data = path.read_bytes()
    head, ids = data[:S._HEADER.size], np.frombuffer(data, "<i4", offset=S._HEADER.size).copy()
    if damage == "garbage":
        path.write_bytes(b"\x00\xffnot a cache")
    elif damage == "truncated":
        path.write_bytes(data[:1000])
    elif damage in ("wrong ids", "out of range"):
        ids[::2] = ids[::-2] if damage == "wrong ids" else len(pieces) + 5
        path.write_bytes(head + ids.tobytes())
    elif damage == "wrong header":
        magic, version, n, m = S._HEADER.unpack(head)
        path.write_bytes(S._HEADER.pack(magic, version, n + 1, m) + ids.tobytes())
    else:
        path.write_bytes(b"")
    assert _encode_all(tokenizer_from_gguf(md)[0]) == want
    # ... and the rebuilt merges replaced the damaged file.
    assert S._read_cache(path, pieces, _vocab(pieces)) is not None


def test_unwritable_or_disabled_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "CACHE_MIN_PIECES", 1)
    pieces, types = _random_vocab(3, n=800, alphabet=TOK_ALPHABET)
    md = _spm_metadata(pieces, types)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir under a file fails
    monkeypatch.delenv(S.CACHE_ENV_DISABLE, raising=False)
    a = _encode_all(tokenizer_from_gguf(md)[0])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(S.CACHE_ENV_DISABLE, "1")
    b = _encode_all(tokenizer_from_gguf(md)[0])
    assert a == b and not (tmp_path / "xdg").exists()


def test_gemma3_ids_identical_with_and_without_cache(gemma3_path, cache_home):
    md = open_gguf(gemma3_path).metadata
    pieces = list(md["tokenizer.ggml.tokens"])  # Gemma's pieces need no respelling
    types = np.asarray(md["tokenizer.ggml.token_type"])
    vocab = _vocab(pieces)
    want = S.spm_merge_ids(pieces, vocab, None, types)
    assert len(want[0]) > 500_000
    for _ in range(2):  # miss, then hit
        for a, b in zip(S.cached_spm_merge_ids(pieces, vocab, None, types), want):
            np.testing.assert_array_equal(a, b)
    assert len(list(cache_home.glob("spm-merges-*.bin"))) == 1


# ------------------------------------------------------------------------------ the file

def _write(path, tensors, strings):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", strings)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(params=["python", "c"])
def string_reader(request, monkeypatch):
    """Both readers of string arrays: the Python loop and the C helper (when built)."""
    from mistralrs_quant import _gguf_parse
    from mistralrs_quant.kernels import cpp
    if request.param == "c":
        if not cpp.available():
            pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
        monkeypatch.setattr(_gguf_parse, "FAST_STRINGS_MIN", 1)
        calls = []
        real = cpp.gguf_strings
        monkeypatch.setattr(cpp, "gguf_strings", lambda *a: calls.append(1) or real(*a))
        yield calls
        assert calls, "the C reader was never used"
    else:
        monkeypatch.setattr(_gguf_parse, "FAST_STRINGS_MIN", 1 << 62)
        yield None


def test_string_arrays(tmp_path, string_reader):
    strings = ["", "a", "▁héllo", "🙂" * 40, "\x00x"] * 1000
    g = open_gguf(_write(tmp_path / "s.gguf", {"w": np.zeros(4, np.float32)}, strings))
    assert g.metadata["tokenizer.ggml.tokens"] == strings


def test_invalid_utf8_is_replaced_alike(tmp_path, string_reader):
    # gguf-py writes str only: patch raw bytes of one piece into invalid UTF-8.
    path = _write(tmp_path / "u.gguf", {"w": np.zeros(4, np.float32)}, ["abc", "XYZW", "d"] * 3)
    data = path.read_bytes()
    at = data.index(b"XYZW")
    path.write_bytes(data[:at] + b"\xff\xfe\xc3(" + data[at + 4:])
    tokens = open_gguf(path).metadata["tokenizer.ggml.tokens"]
    assert tokens[1] == b"\xff\xfe\xc3(".decode("utf-8", "replace") and tokens[0] == "abc"


@pytest.mark.parametrize("cut", ["in a length", "in a string"])
def test_string_array_cut_short(tmp_path, string_reader, cut):
    # Long pieces, cut late: past the up-front size check (8 bytes a piece), inside the array.
    pieces = ["piece%03d" % i + "x" * 30 for i in range(50)]
    path = _write(tmp_path / "t.gguf", {"w": np.zeros(4, np.float32)}, pieces)
    data = path.read_bytes()
    at = data.index(b"piece040") - (3 if cut == "in a length" else -3)
    path.write_bytes(data[:at])
    with pytest.raises(ValueError, match=r"t\.gguf: truncated GGUF file: metadata 'tokenizer\.ggml\.tokens'"):
        open_gguf(path)


def test_release_unused_pages_keeps_live_tensors(tmp_path, rng):
    page_floats = mmap.PAGESIZE // 4
    tensors = {f"w{i}": rng.standard_normal(8 * page_floats + 3 * i).astype(np.float32) for i in range(4)}
    path = _write(tmp_path / "t.gguf", tensors, [f"tok{i}" for i in range(5000)])
    g = open_gguf(path)
    kept = {name: g.tensors[name].dequantize() for name in ("w1", "w3")}   # views of the mapping
    copied = g.tensors["w0"].dequantize().clone()                          # the view dies
    g.tensors["w2"].raw_tensor()
    released = g.release_unused_pages()
    # The header (5000 strings), w0 and w2 at least, never the pages of w1 and w3.
    assert released >= 2 * 8 * mmap.PAGESIZE
    assert released <= path.stat().st_size - 2 * 8 * mmap.PAGESIZE
    for name, t in kept.items():
        np.testing.assert_array_equal(t.numpy(), tensors[name])
    np.testing.assert_array_equal(copied.numpy(), tensors["w0"])
    for name, info in g.tensors.items():  # released pages read back from the file
        np.testing.assert_array_equal(info.dequantize().numpy(), tensors[name])
    assert torch.equal(kept["w1"], torch.from_numpy(tensors["w1"]))


def test_string_reader_never_starts_a_compile(tmp_path, monkeypatch):
    from mistralrs_quant.kernels import cpp
    monkeypatch.setattr(cpp, "_state", cpp._State())            # as in a fresh process ...
    monkeypatch.setattr(cpp, "cache_dir", lambda: tmp_path / "none")  # ... with nothing built
    monkeypatch.setattr(cpp, "_build", lambda: pytest.fail("a header read started a compile"))
    buf = bytes(8) * 3
    assert cpp.gguf_strings(buf, 0, 3) is None
    monkeypatch.setenv(cpp.ENV_DISABLE, "1")
    assert cpp.gguf_strings(buf, 0, 3) is None
