"""Embedding models through ``Runner.send_embedding_request`` against sentence-transformers,
on tiny random sentence-transformers folders (float32)."""
from __future__ import annotations

COVERS = ["EmbeddingGemma", "Qwen3Embedding"]

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
st_lib = pytest.importorskip("sentence_transformers")

from mistralrs import EmbeddingArchitecture, EmbeddingRequest, Runner, Which  # noqa: E402
from mistralrs_core.testing.parity import perturb_parameters  # noqa: E402
from mistralrs_core.testing.tiny import tokenizer_vocab_size, write_tiny_tokenizer  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris",
    "Once upon a time there was a compiler that loved borrowing and lifetimes.",
    "def main():\n    print('hello world')",
]
MAX_POS = 96


def write_tokenizer(out: Path, template: str, padding_side: str) -> int:
    """A tiny byte-level tokenizer whose post-processor adds ``template``'s special tokens."""
    from tokenizers import Tokenizer, processors
    write_tiny_tokenizer(out, vocab_size=256)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    specials = sorted({w for w in template.split() if w.startswith("<|")})
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials])
    tok.save(str(out / "tokenizer.json"))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    # No chat template: sentence-transformers would otherwise render texts as chat messages.
    del cfg["chat_template"]
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", padding_side=padding_side)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tokenizer_vocab_size(out)


def build_st(tmp: Path, body_fn, template: str, padding_side: str, head_fn):
    """Save a sentence-transformers model (random perturbed body + ``head_fn(hidden)``)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Transformer
    base = tmp / "base"
    vocab = write_tokenizer(base, template, padding_side)
    torch.manual_seed(0)
    body = body_fn(vocab).float().eval()
    perturb_parameters(body)
    body.save_pretrained(base)
    st = SentenceTransformer(modules=[Transformer(str(base)), *head_fn(body.config.hidden_size)], device="cpu")
    st.eval()
    out = tmp / "st"
    st.save(str(out))
    return st, out


def gemma_st(tmp):
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling

    def body(vocab):
        cfg = transformers.Gemma3TextConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
            # 8 becomes a symmetric window |q - k| < 5: shorter than most inputs here.
            sliding_window=8, use_bidirectional_attention=True, max_position_embeddings=MAX_POS,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
            pad_token_id=0)
        cfg._attn_implementation = "eager"
        return transformers.Gemma3TextModel(cfg)

    def head(h):
        g = torch.Generator().manual_seed(1)
        d1 = Dense(h, 96, bias=False, activation_function=torch.nn.Identity())
        d2 = Dense(96, 48, bias=True, activation_function=torch.nn.Identity())
        with torch.no_grad():
            for d in (d1, d2):
                for p in d.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return [Pooling(h, "mean"), d1, d2, Normalize()]

    return build_st(tmp, body, "<|im_start|> $A <|im_end|>", "right", head)


def qwen_st(tmp):
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    def body(vocab):
        cfg = transformers.Qwen3Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POS,
            rms_norm_eps=1e-6, tie_word_embeddings=True)
        return transformers.Qwen3Model(cfg)

    # As Qwen3-Embedding: <|endoftext|> appended by the post-processor, left padding.
    return build_st(tmp, body, "$A <|endoftext|>", "left",
                    lambda h: [Pooling(h, "lasttoken"), Normalize()])


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    st, path = gemma_st(tmp_path_factory.mktemp("embeddinggemma"))
    runner = Runner(which=Which.Embedding(model_id=str(path), dtype="F32"))
    yield st, path, runner
    runner.shutdown()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    st, path = qwen_st(tmp_path_factory.mktemp("qwen3emb"))
    runner = Runner(which=Which.Embedding(model_id=str(path), arch=EmbeddingArchitecture.Qwen3Embedding,
                                          dtype="F32"))
    yield st, path, runner
    runner.shutdown()


def cos_dist(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def check_against_reference(st, runner):
    ours = runner.send_embedding_request(EmbeddingRequest(input=TEXTS))
    assert len(ours) == len(TEXTS) and all(isinstance(x, float) for x in ours[0])
    alone = [st.encode([t], convert_to_tensor=True)[0].tolist() for t in TEXTS]
    batched = st.encode(TEXTS, batch_size=len(TEXTS), convert_to_tensor=True).tolist()
    d_alone, d_batched = cos_dist(ours, alone), cos_dist(ours, batched)
    print(f"cosine distance: vs alone {d_alone:.2e}, vs reference batch {d_batched:.2e}")
    assert d_alone <= 1e-5 and d_batched <= 1e-5
    # Each input alone gives the same vector as in the batch.
    singles = [runner.send_embedding_request(EmbeddingRequest(input=t))[0] for t in TEXTS]
    assert cos_dist(ours, singles) <= 1e-6
    return ours


def test_embedding_gemma_matches_reference(gemma):
    st, path, runner = gemma
    ours = check_against_reference(st, runner)
    assert len(ours[0]) == 48
    assert abs(sum(x * x for x in ours[0]) - 1) < 1e-5
    model = runner._pipeline(None).model
    assert not model.causal and model.backbone.cfg.sliding_window == 5
    # The inputs must be longer than the window for the test to mean anything.
    assert max(len(runner.tokenize_text(t)) for t in TEXTS) > 10


def test_qwen3_embedding_matches_reference(qwen):
    st, path, runner = qwen
    check_against_reference(st, runner)
    ids = runner.tokenize_text("Paris")
    assert ids[-1] == runner.tokenize_text("<|endoftext|>", add_special_tokens=False)[0]


def test_arch_detection(gemma, qwen):
    from mistralrs_core.loading.hf_config import load_model_config
    from mistralrs_core.loading.model_loader import detect_architecture
    assert detect_architecture(load_model_config(gemma[1]), "embedding").name == "EmbeddingGemma"
    assert detect_architecture(load_model_config(qwen[1]), "embedding").name == "Qwen3Embedding"
    assert gemma[2]._pipeline(None).kind == "embedding"


def test_input_forms(gemma):
    _, _, runner = gemma
    text = TEXTS[0]
    ids = runner.tokenize_text(text)
    one = runner.send_embedding_request(EmbeddingRequest(input=text))
    assert len(one) == 1
    from_ids = runner.send_embedding_request(EmbeddingRequest(input=ids))
    assert len(from_ids) == 1 and cos_dist(one, from_ids) <= 1e-6
    many_ids = [runner.tokenize_text(t) for t in TEXTS[:3]]
    from_lists = runner.send_embedding_request(EmbeddingRequest(input=many_ids))
    from_texts = runner.send_embedding_request(EmbeddingRequest(input=TEXTS[:3]))
    assert len(from_lists) == 3 and cos_dist(from_lists, from_texts) <= 1e-6


@pytest.mark.parametrize("bad, field", [
    ([], "input"),
    ("", "input"),
    ([[]], "input[0]"),
    ([1, -1], "input[1]"),
    ([1, 2 ** 32], "input[1]"),
    ([[1], [5000]], "input[1][0]"),
    ([7, 300], "input[1]"),
])
def test_invalid_inputs(gemma, bad, field):
    with pytest.raises(ValueError, match="^" + re.escape(field + ":")):
        gemma[2].send_embedding_request(EmbeddingRequest(input=bad))


def test_context_length_and_truncation(gemma):
    st, _, runner = gemma
    assert runner.max_sequence_length() == MAX_POS
    long_text = " ".join(TEXTS) * 3
    with pytest.raises(ValueError, match="truncate_sequence"):
        runner.send_embedding_request(EmbeddingRequest(input=[TEXTS[1], long_text]))
    with pytest.raises(ValueError, match="truncate_sequence"):
        runner.send_embedding_request(EmbeddingRequest(input=list(range(3, MAX_POS + 4))))
    ours = runner.send_embedding_request(EmbeddingRequest(input=[TEXTS[1], long_text], truncate_sequence=True))
    # The reference truncates the text and keeps the special tokens, as we do.
    st[0].max_seq_length = MAX_POS
    try:
        theirs = st.encode([TEXTS[1], long_text], convert_to_tensor=True).tolist()
    finally:
        st[0].max_seq_length = None
    assert cos_dist(ours, theirs) <= 1e-5
    ids = runner.send_embedding_request(EmbeddingRequest(input=list(range(3, MAX_POS + 4)), truncate_sequence=True))
    assert cos_dist(ids, runner.send_embedding_request(EmbeddingRequest(input=list(range(3, MAX_POS + 3))))) <= 1e-6


def test_generation_requests_refused(gemma):
    from mistralrs import ChatCompletionRequest, CompletionRequest
    runner = gemma[2]
    with pytest.raises(ValueError, match="embedding model"):
        runner.send_chat_completion_request(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
    with pytest.raises(ValueError, match="embedding model"):
        runner.send_completion_request(CompletionRequest(prompt="hi"))
    assert runner.detokenize_text(runner.tokenize_text("Paris")) == "Paris"


def test_pooling_modes_match_sentence_transformers():
    from sentence_transformers.sentence_transformer.modules import Pooling

    from mistralrs_core.models.sentence import POOLING_MODES, pool, pooling_modes
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7]
    hidden = torch.randn(sum(lengths), 8, generator=g, dtype=torch.float64)
    padded = torch.zeros(len(lengths), max(lengths), 8, dtype=torch.float64)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
    for i, seq in enumerate(torch.split(hidden, lengths)):
        padded[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    for mode in POOLING_MODES:
        ref = Pooling(8, mode)({"token_embeddings": padded, "attention_mask": mask})["sentence_embedding"]
        assert torch.allclose(pool(hidden, lengths, (mode,)), ref), mode
    # Legacy boolean spelling and combined modes (concatenated in the reference's order).
    assert pooling_modes({"pooling_mode_mean_tokens": True}) == ("mean",)
    assert pooling_modes({"pooling_mode_cls_token": True, "pooling_mode_lasttoken": True}) == ("cls", "lasttoken")
    assert pooling_modes({}) == ("mean",)
    with pytest.raises(ValueError):
        pooling_modes({"pooling_mode": "attention"})


def test_dense_refuses_untrusted_activation(tmp_path):
    from safetensors.torch import save_file

    from mistralrs_core.models.sentence import DenseLayer
    (tmp_path / "config.json").write_text(json.dumps(
        {"in_features": 2, "out_features": 2, "bias": False, "activation_function": "evil.module.Act"}))
    save_file({"linear.weight": torch.eye(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="activation"):
        DenseLayer(tmp_path, "cpu")


def test_large_batches_split_into_several_forwards(gemma, monkeypatch):
    import mistralrs_core.pipeline.embedding as emb
    runner = gemma[2]
    whole = runner.send_embedding_request(EmbeddingRequest(input=TEXTS))
    monkeypatch.setattr(emb, "_MAX_PADDED_TOKENS", 80)
    assert [len(g) for g in emb._groups([[0] * 40, [0] * 30, [0] * 50, [0] * 10])] == [2, 1, 1]
    assert cos_dist(runner.send_embedding_request(EmbeddingRequest(input=TEXTS)), whole) <= 1e-6
