"""Legacy llama.cpp model files ('ggml', 'ggmf', 'ggjt'): a tiny LLaMA written by hand in
each format loads with the same logits as its safetensors twin (holding the file's
dequantized values), its vocabulary becomes a working SentencePiece tokenizer, and every
damaged file gives one readable error naming it."""
import struct

import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as T

from gguf_convert import patch_bytes, set_values, write_ggml
from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.testing.parity import SingleSequence, load_for_test, max_rel_err, our_greedy, \
    perturb_parameters, random_prompt, save_reference
from mistralrs_quant.ggml_loader import load_ggml_model
from mistralrs_quant.ggml_reader import open_ggml

TOL = 1e-4
_MERGED = ["he", "ll", "\u2581w", "or", "\u2581t", "at", "ld", "\u2581c", "\u2581s", "hell", "hello",
           "\u2581hello", "orld", "\u2581world", "\u2581the", "\u2581cat", "\u2581sat"]
_CHARS = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "t", "c", "a", "s"]
# A SentencePiece vocabulary laid out as LLaMA's: unk, bos, eos, 256 byte pieces, then
# pieces by descending score (merge order), then single characters.
PIECES = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _MERGED + _CHARS
SCORES = [0.0] * 259 + [-float(i) for i in range(len(_MERGED))] + [-100.0 - i for i in range(len(_CHARS))]
VOCAB = len(PIECES)
GQA = 2
# The F16 / Q4_0 / Q8_0 mix of a ggjt v3 q4_0 file.
V3_TYPES = {"tok_embeddings": T.F16, "attention.w": T.Q4_0, "feed_forward": T.Q8_0, "output": T.Q8_0}


def tiny_llama(seed=0):
    # n_ff = 768 is what llama.cpp derives from n_embd 256 and n_mult 256.
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4 // GQA, rms_norm_eps=1e-5,
                                   max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    perturb_parameters(ref, seed=seed)
    return cfg, ref


def logits_run(model, prompt, steps=3):
    run = SingleSequence(model)
    out = [run.step(prompt)]
    for i in range(steps):
        out.append(run.step([(prompt[-1] * 7 + 3 + i) % VOCAB]))
    return torch.cat(out)


def write_tiny(path, magic="ggjt", version=3, types=V3_TYPES, seed=0):
    cfg, ref = tiny_llama(seed)
    held = write_ggml(path, ref, cfg, PIECES, SCORES, types, magic=magic, version=version)
    set_values(ref, held)
    return ref


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    d = tmp_path_factory.mktemp("ggml")
    ref = write_tiny(d / "tiny-q4_0.bin")
    return d, save_reference(ref, d / "st")


@pytest.mark.parametrize("magic, version, types", [
    ("ggjt", 3, V3_TYPES),
    ("ggjt", 2, {"tok_embeddings": T.F16, "feed_forward": T.Q5_0, "attention.w": T.Q5_1}),
    ("ggjt", 1, {"attention.w": T.F16}),
    ("ggmf", 1, {"feed_forward": T.F16}),
    ("ggml", 0, {}),
])
def test_formats_match_safetensors(tmp_path, magic, version, types):
    path = tmp_path / "m.bin"
    ref = write_tiny(path, magic, version, types)
    f = open_ggml(path)
    assert (f.magic, f.version, f.hparams.n_ff) == (magic, version, 768)
    assert (f.scores is None) == (magic == "ggml")
    want = load_for_test(save_reference(ref, tmp_path / "st"), "Llama")
    got, hf, _ = load_ggml_model(path, torch.float32, gqa=GQA)
    assert (hf["num_key_value_heads"], hf["intermediate_size"]) == (2, 768)
    prompt = random_prompt(20, VOCAB, 1)
    err = max_rel_err(logits_run(got, prompt), logits_run(want, prompt))
    print(f"{magic} v{version}: max rel err {err:.2e}")
    assert err <= TOL


def test_v3_weights_stay_packed(v3):
    d, _ = v3
    f = open_ggml(d / "tiny-q4_0.bin")
    assert {i.type_name for i in f.tensors.values()} == {"F32", "F16", "Q4_0", "Q8_0"}
    assert not f.tensors["layers.0.attention.wq.weight"].raw.flags.owndata   # a view of the mapping
    got, _, _ = load_ggml_model(d / "tiny-q4_0.bin", torch.float32, gqa=GQA)
    packed = {n.rsplit(".", 1)[-1] for n, m in got.named_modules() if getattr(m, "qmethod", None) is not None}
    assert {"o_proj", "down_proj", "lm_head"} <= packed


def test_runner_with_vocab_tokenizer(v3):
    d, st = v3
    r = Runner(which=Which.GGML(quantized_model_id=str(d), quantized_filename="tiny-q4_0.bin", gqa=GQA))
    try:
        ids = r.tokenize_text("hello world the cat z")
        piece = {p: i for i, p in enumerate(PIECES)}
        assert ids == [1] + [piece[p] for p in ("\u2581hello", "\u2581world", "\u2581the", "\u2581cat", "\u2581")] \
            + [3 + ord("z")]   # an unknown character falls back to its byte piece
        assert r.detokenize_text(ids) == "hello world the cat z"
        res = r.send_completion_request(CompletionRequest(model="default", prompt="hello world", max_tokens=5,
                                                          temperature=0))
        prompt = r.tokenize_text("hello world")
        greedy = our_greedy(load_for_test(st, "Llama"), prompt, 5)
        expect = greedy[:greedy.index(2)] if 2 in greedy else greedy
        assert res.choices[0].text == r.detokenize_text(expect)
    finally:
        r.shutdown()


def test_runner_tokenizer_override(v3, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    d, _ = v3
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 9}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    for kw in (dict(tok_model_id=str(tmp_path)), dict(tokenizer_json=str(tmp_path / "tokenizer.json"))):
        r = Runner(which=Which.GGML(quantized_model_id=str(d), quantized_filename="tiny-q4_0.bin", gqa=GQA, **kw))
        try:
            assert r.tokenize_text("hello", add_special_tokens=False) == [9]
        finally:
            r.shutdown()


def test_wrong_gqa_is_explained(v3):
    d, _ = v3
    with pytest.raises(ValueError, match=r"tiny-q4_0\.bin: layers\.0\.attention\.wk\.weight has 128 rows.*pass gqa=2"):
        Runner(which=Which.GGML(quantized_model_id=str(d), quantized_filename="tiny-q4_0.bin"))
    with pytest.raises(ValueError, match="gqa: 3 does not divide the 4 attention heads"):
        load_ggml_model(d / "tiny-q4_0.bin", torch.float32, gqa=3)


# ---------------------------------------------------------------- damaged files

def _copy(v3, tmp_path, name="bad.bin"):
    d, _ = v3
    path = tmp_path / name
    path.write_bytes((d / "tiny-q4_0.bin").read_bytes())
    return path


def _record(path, name: bytes) -> int:
    """Offset of a tensor record (its n_dims field)."""
    buf = path.read_bytes()
    pos = buf.index(name)
    n_dims = struct.unpack_from("<I", buf, pos - 3 * 4 - 2 * 4)[0]
    assert n_dims == 2
    return pos - 3 * 4 - 2 * 4


@pytest.mark.parametrize("data, pattern", [
    (b"abcd", r"bad\.bin: not a GGML file \(magic bytes b'abcd'"),
    (b"GGUF", r"bad\.bin: this is a GGUF file, not a legacy GGML file; load it with Which\.GGUF"),
    (struct.pack("<I", 0x67676C61), r"bad\.bin: this is a LoRA adapter"),
    (struct.pack("<II", 0x67676A74, 4), r"bad\.bin: unsupported 'ggjt' version 4 \(supported: 1, 2, 3\)"),
    (struct.pack("<II", 0x67676D66, 2), r"bad\.bin: unsupported 'ggmf' version 2 \(supported: 1\)"),
])
def test_bad_magic_or_version(v3, tmp_path, data, pattern):
    path = _copy(v3, tmp_path)
    patch_bytes(path, 0, data)
    with pytest.raises(ValueError, match=pattern):
        open_ggml(path)


@pytest.mark.parametrize("keep, what", [(2, "truncated GGML file"), (20, "hyperparameter n_head"),
                                        (600, "vocabulary"), (-100, "the data of tensor 'output.weight'")])
def test_truncated(v3, tmp_path, keep, what):
    path = _copy(v3, tmp_path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError, match=rf"bad\.bin: .*{what}|bad\.bin: truncated"):
        open_ggml(path)


def test_truncated_after_vocabulary(v3, tmp_path):
    path = _copy(v3, tmp_path)
    path.write_bytes(path.read_bytes()[:_record(path, b"tok_embeddings.weight")])
    with pytest.raises(ValueError, match=r"bad\.bin: GGML file holds no tensors"):
        open_ggml(path)


@pytest.mark.parametrize("type_id, name", [(99, "unknown type 99"), (4, "unknown type 4"), (int(T.IQ2_XS), "IQ2_XS")])
def test_unknown_tensor_type(v3, tmp_path, type_id, name):
    path = _copy(v3, tmp_path)
    patch_bytes(path, _record(path, b"layers.0.attention.wq.weight") + 8, struct.pack("<I", type_id))
    with pytest.raises(ValueError, match=rf"bad\.bin: tensor 'layers\.0\.attention\.wq\.weight' has type {name}, "
                                         r"not supported"):
        open_ggml(path)


def test_old_block_layout_refused(tmp_path):
    path = tmp_path / "v2.bin"
    write_tiny(path, "ggjt", 2, {"attention.w": T.Q4_0})
    with pytest.raises(ValueError, match=r"v2\.bin: tensor '.*' has type Q4_0, stored with the block layout of "
                                         r"ggjt v2, which predates today's"):
        open_ggml(path)


def test_malformed_record(v3, tmp_path):
    path = _copy(v3, tmp_path)
    patch_bytes(path, _record(path, b"layers.0.attention.wq.weight"), struct.pack("<I", 0))
    with pytest.raises(ValueError, match=r"bad\.bin: malformed GGML tensor record .*0 dimensions"):
        open_ggml(path)


def test_runner_errors_name_the_file(v3, tmp_path):
    d, _ = v3
    good = Runner(which=Which.GGML(quantized_model_id=str(d), quantized_filename="tiny-q4_0.bin", gqa=GQA))
    try:
        path = _copy(v3, tmp_path)
        path.write_bytes(path.read_bytes()[:-100])
        with pytest.raises(ValueError, match=r"bad\.bin: truncated GGML file") as info:
            Runner(which=Which.GGML(quantized_model_id=str(tmp_path), quantized_filename="bad.bin", gqa=GQA))
        assert info.value.__cause__ is None
        with pytest.raises(FileNotFoundError, match="nope.bin"):
            good.add_model(Which.GGML(quantized_model_id=str(tmp_path), quantized_filename="nope.bin"))
        res = good.send_completion_request(CompletionRequest(model="default", prompt="the cat", max_tokens=2,
                                                             temperature=0))
        assert res.usage.completion_tokens >= 1
    finally:
        good.shutdown()
