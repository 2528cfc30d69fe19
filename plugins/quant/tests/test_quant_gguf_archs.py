"""Every family with a GGUF architecture loads from a GGUF file written the way llama.cpp's
converter writes it, and computes the same logits as the same weights from safetensors.

Quantized files are compared with a safetensors model holding the file's dequantized
values, so the comparison stays exact (only summation order differs) whatever the
quantization error. The Runner tests go through ``Which.GGUF`` end to end: the file's
tokenizer, ``tok_model_id``/``tokenizer_json`` overrides, split files, and one clear
error per damaged file while other models keep serving.
"""
import struct

import gguf
import pytest
import torch
import transformers

from gguf_convert import add_gpt2_tokenizer, gguf_entries, gguf_tensor_record, patch_bytes, set_values, write_gguf, \
    write_metadata
from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.testing.parity import SingleSequence, load_for_test, max_rel_err, our_greedy, \
    perturb_parameters, random_prompt, save_reference
from mistralrs_quant.gguf_loader import load_gguf_model

VOCAB = 288
TOL = 1e-4
BASE = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _phi3():
    # LongRoPE past a 16-token original context: the 20-token prompt runs on the long factors.
    half = 32
    return transformers.Phi3Config(
        **{**BASE, "max_position_embeddings": 64}, original_max_position_embeddings=16,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "longrope", "partial_rotary_factor": 1.0,
                         "short_factor": [1.0 + 0.05 * i for i in range(half)],
                         "long_factor": [1.0 + 0.5 * i for i in range(half)]})


# case: (GGUF architecture, family, transformers config)
CASES = {
    # Llama 3.1-style rope scaling, which llama.cpp stores as the rope_freqs tensor.
    "llama": ("llama", "Llama", lambda: transformers.LlamaConfig(**BASE, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # Mistral GGUFs say "llama"; a head size other than hidden/heads (as Mistral Nemo).
    "mistral": ("llama", "Mistral", lambda: transformers.MistralConfig(**BASE, head_dim=32, sliding_window=None)),
    "qwen2": ("qwen2", "Qwen2", lambda: transformers.Qwen2Config(**BASE, tie_word_embeddings=True)),
    "qwen3": ("qwen3", "Qwen3", lambda: transformers.Qwen3Config(**BASE, head_dim=64)),
    "gemma": ("gemma", "Gemma", lambda: transformers.GemmaConfig(**BASE, head_dim=64)),
    "gemma2": ("gemma2", "Gemma2", lambda: transformers.Gemma2Config(
        **BASE, head_dim=64, query_pre_attn_scalar=64, sliding_window=8)),
    # Six layers: five sliding ones and one global, the pattern llama.cpp assumes.
    "gemma3": ("gemma3", "Gemma3", lambda: transformers.Gemma3TextConfig(
        **{**BASE, "num_hidden_layers": 6}, head_dim=64, query_pre_attn_scalar=64, sliding_window=8)),
    "phi2": ("phi2", "Phi2", lambda: transformers.PhiConfig(**{**BASE, "num_key_value_heads": 4},
                                                            partial_rotary_factor=0.5)),
    "phi3": ("phi3", "Phi3", _phi3),
    "starcoder2": ("starcoder2", "Starcoder2", lambda: transformers.Starcoder2Config(**BASE)),
    # Four layers: the last has no rope (llama.cpp's fixed interval of 4).
    "smollm3": ("smollm3", "SmolLm3", lambda: transformers.SmolLM3Config(**{**BASE, "num_hidden_layers": 4})),
}


def tiny(case, seed=0):
    arch, family, make = CASES[case]
    cfg = make()
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    perturb_parameters(ref, seed=seed)
    return arch, family, cfg, ref


def logits_run(model, prompt, steps=3):
    """Prefill logits, then ``steps`` cached decode steps."""
    run = SingleSequence(model)
    out = [run.step(prompt)]
    for i in range(steps):
        out.append(run.step([(prompt[-1] * 7 + 3 + i) % VOCAB]))
    return torch.cat(out)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("case", list(CASES))
def test_arch_matches_safetensors(tmp_path, case, qtype):
    arch, family, cfg, ref = tiny(case)
    path = tmp_path / f"{case}.{qtype}.gguf"
    held = write_gguf(path, arch, ref, cfg, qtype)
    if qtype != "F32":
        set_values(ref, held)
    want = load_for_test(save_reference(ref, tmp_path / "st"), family)
    got, hf, g = load_gguf_model([path], torch.float32)
    if case != "mistral":   # a Mistral GGUF says "llama" and loads as Llama
        assert type(got).__name__ == type(want).__name__

    types = {info.type_name for info in g.tensors.values()}
    packed = [m for m in got.modules() if getattr(m, "qmethod", None) is not None]
    if qtype == "F32":
        assert types == {"F32"} and not packed
    else:
        assert {"Q8_0"} <= types if qtype == "Q8_0" else {"Q4_K", "Q6_K"} <= types
        assert packed  # quantized weights stay packed, not dequantized at load

    prompt = random_prompt(20, VOCAB, 1)
    err = max_rel_err(logits_run(got, prompt), logits_run(want, prompt))
    print(f"{case} {qtype}: max rel err {err:.2e}")
    assert err <= TOL


def test_config_details():
    """What the comparisons above rely on, stated directly."""
    from mistralrs_quant.gguf_config import hf_config_from_gguf

    class Info:
        def __init__(self, shape, values=None):
            self.shape, self.values = shape, values

        def dequantize(self):
            return torch.tensor(self.values)

    md = {"general.architecture": "phi3", "phi3.block_count": 2, "phi3.embedding_length": 256,
          "phi3.feed_forward_length": 512, "phi3.attention.head_count": 4, "phi3.attention.head_count_kv": 4,
          "phi3.context_length": 131072, "phi3.rope.scaling.original_context_length": 4096,
          "phi3.rope.dimension_count": 48, "phi3.attention.sliding_window": 0,
          "phi3.rope.scaling.attn_factor": 1.19}
    tensors = {"blk.0.ffn_down.weight": Info((256, 512)), "rope_factors_long.weight": Info((24,), [2.0] * 24),
               "rope_factors_short.weight": Info((24,), [1.0] * 24), "output.weight": Info((300, 256))}
    hf = hf_config_from_gguf(md, tensors, 300)
    assert hf["sliding_window"] is None               # Phi-4 writes 0: no window
    assert hf["partial_rotary_factor"] == 0.75        # 48 of 64 dims rotate
    assert hf["rope_scaling"]["long_factor"] == [2.0] * 24 and hf["rope_scaling"]["attention_factor"] == 1.19
    assert hf["original_max_position_embeddings"] == 4096 and not hf["tie_word_embeddings"]

    md = {"general.architecture": "gemma2", "gemma2.block_count": 46, "gemma2.embedding_length": 4608,
          "gemma2.feed_forward_length": 36864, "gemma2.attention.head_count": 32,
          "gemma2.attention.head_count_kv": 16, "gemma2.attention.key_length": 128}
    assert hf_config_from_gguf(md, {}, 256000)["query_pre_attn_scalar"] == 144   # 27B: hidden / heads
    md["gemma2.block_count"] = 42
    assert hf_config_from_gguf(md, {}, 256000)["query_pre_attn_scalar"] == 128   # 9B: head_dim


def test_phi2_separate_qkv(tmp_path):
    """Phi-2 GGUFs converted from today's HF checkpoint keep q/k/v apart."""
    arch, family, cfg, ref = tiny("phi2")
    set_values(ref, write_gguf(tmp_path / "p.gguf", arch, ref, cfg, "Q8_0", fuse_qkv=False))
    got, _, g = load_gguf_model([tmp_path / "p.gguf"], torch.float32)
    assert "blk.0.attn_q.weight" in g.tensors and "blk.0.attn_qkv.weight" not in g.tensors
    want = load_for_test(save_reference(ref, tmp_path / "st"), family)
    prompt = random_prompt(12, VOCAB, 2)
    assert max_rel_err(logits_run(got, prompt), logits_run(want, prompt)) <= TOL


# ---------------------------------------------------------------- through the Runner

@pytest.fixture(scope="module")
def qwen2_files(tmp_path_factory):
    """A Q8_0 Qwen2 GGUF with a byte-level BPE tokenizer, the same model split in two
    files, and the safetensors model holding the file's values."""
    d = tmp_path_factory.mktemp("qwen2")
    arch, family, cfg, ref = tiny("qwen2", seed=3)
    held = write_gguf(d / "model.gguf", arch, ref, cfg, "Q8_0", tokenizer_size=VOCAB)
    write_gguf(d / "split.gguf", arch, ref, cfg, "Q8_0", tokenizer_size=VOCAB, split_max_tensors=14)
    set_values(ref, held)
    st = save_reference(ref, d / "st")
    return d, st, family


def runner(d, filename, **kw):
    return Runner(which=Which.GGUF(quantized_model_id=str(d), quantized_filename=filename, **kw))


def test_runner_completes_with_file_tokenizer(qwen2_files):
    d, st, family = qwen2_files
    want = load_for_test(st, family)
    r = runner(d, "model.gguf")
    try:
        text = "the cat sat on the mat"
        ids = r.tokenize_text(text, add_special_tokens=False)
        assert 0 < len(ids) < len(text)   # merges applied: fewer tokens than bytes
        assert r.detokenize_text(ids) == text
        res = r.send_completion_request(CompletionRequest(model="default", prompt=text, max_tokens=6,
                                                          temperature=0))
        greedy = our_greedy(want, ids, 6)
        eos = VOCAB - 1
        expect = greedy[:greedy.index(eos)] if eos in greedy else greedy
        assert res.choices[0].text == r.detokenize_text(expect)
        assert res.usage.prompt_tokens == len(ids)
    finally:
        r.shutdown()


def test_runner_tokenizer_overrides(qwen2_files, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    d, _, _ = qwen2_files
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 5, "world": 7}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    for kw in (dict(tok_model_id=str(tok_dir)), dict(tokenizer_json=str(tok_dir / "tokenizer.json"))):
        r = runner(d, "model.gguf", **kw)
        try:
            assert r.tokenize_text("hello world", add_special_tokens=False) == [5, 7], kw
        finally:
            r.shutdown()


def test_runner_split_files(qwen2_files):
    d, st, family = qwen2_files
    parts = sorted(p.name for p in d.glob("split-*-of-*.gguf"))
    assert len(parts) == 2
    single, _, _ = load_gguf_model([d / "model.gguf"], torch.float32)
    split, _, g = load_gguf_model([d / p for p in parts], torch.float32)
    assert len({i.file for i in g.tensors.values()}) == 2
    prompt = random_prompt(9, VOCAB, 4)
    assert torch.equal(logits_run(single, prompt), logits_run(split, prompt))
    for filename in (parts, parts[0]):   # all parts, or the first and its siblings by name
        r = runner(d, filename)
        try:
            res = r.send_completion_request(CompletionRequest(model="default", prompt="hello world",
                                                              max_tokens=3, temperature=0))
            assert res.usage.completion_tokens >= 1
        finally:
            r.shutdown()


# ---------------------------------------------------------------- clear errors

def _write_plain(path, arch="qwen2", tokenizer=True):
    """A float Qwen2 file, optionally under another architecture name or without tokenizer."""
    _, _, cfg, ref = tiny("qwen2")
    w = gguf.GGUFWriter(str(path), arch)
    write_metadata(w, "qwen2", cfg)
    if tokenizer:
        add_gpt2_tokenizer(w, VOCAB)
    for e in gguf_entries("qwen2", ref, cfg):
        w.add_tensor(e.name, e.value.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _damage(kind, d):
    path = d / f"{kind}.gguf"
    if kind == "big_endian":
        w = gguf.GGUFWriter(str(path), "qwen2", endianess=gguf.GGUFEndian.BIG)
        w.add_tensor("x", torch.zeros(4).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path, ValueError, "big-endian"
    if kind == "unknown_arch":
        return _write_plain(path, arch="mamba9"), ValueError, "GGUF architecture 'mamba9' has no installed family"
    if kind == "no_tokenizer":
        return _write_plain(path, tokenizer=False), ValueError, "no tokenizer.*tok_model_id="
    if kind == "missing":
        return path, FileNotFoundError, "missing.gguf"
    _write_plain(path)
    pos = gguf_tensor_record(path, b"blk.0.ffn_up.weight")
    if kind == "magic":
        patch_bytes(path, 0, b"GGJT")
        return path, ValueError, "not a GGUF file"
    if kind == "tensor_type":
        patch_bytes(path, pos + 4 + 2 * 8, struct.pack("<I", 99))
        return path, ValueError, "tensor 'blk.0.ffn_up.weight' has type unknown type 99"
    if kind == "offset":
        patch_bytes(path, pos + 4 + 2 * 8 + 4, struct.pack("<Q", 1 << 40))
        return path, ValueError, "extends past the end"
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-4096])
        return path, ValueError, "truncated"
    raise AssertionError(kind)


ERRORS = ["magic", "big_endian", "tensor_type", "truncated", "offset", "unknown_arch", "no_tokenizer", "missing"]


def test_runner_errors_are_clear_and_others_keep_serving(qwen2_files, tmp_path):
    d, _, _ = qwen2_files
    good = runner(d, "model.gguf")
    ask = CompletionRequest(model="default", prompt="the cat", max_tokens=2, temperature=0)
    try:
        before = good.send_completion_request(ask).choices[0].text
        for kind in ERRORS:
            path, exc_type, pattern = _damage(kind, tmp_path)
            for attempt in ("new runner", "add_model"):
                with pytest.raises(exc_type, match=pattern) as info:
                    if attempt == "new runner":
                        runner(tmp_path, path.name)
                    else:
                        good.add_model(Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename=path.name),
                                       model_id=f"bad-{kind}")
                message = str(info.value)
                assert path.name in message, (kind, message)
                assert info.value.__cause__ is None and "\n" not in message, (kind, message)
            assert good.list_models() == [str(d)]
            assert good.send_completion_request(ask).choices[0].text == before
    finally:
        good.shutdown()
