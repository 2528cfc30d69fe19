"""The core's multimodal seams, proven through a test family (tests/plugins/multimodal_family):
encoder features replace placeholder embeddings, the model supplies 3-axis M-RoPE positions,
and image requests batch with plain text requests through the Runner.

The reference is transformers' Qwen2-VL language model fed ``inputs_embeds`` (text
embeddings with the image rows replaced) and 3-axis ``position_ids`` computed here,
independently of the family's own position code.
"""
import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core.testing.concurrency import submitted_together
from mistralrs_core.testing.parity import perturb_parameters
from mistralrs_core.testing.tiny import tokenizer_vocab_size, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VLTextConfig, Qwen2VLTextModel)

GRID, PATCH = 2, 3
SECTIONS = [2, 3, 3]            # head_dim 16: rotary half of 8


class Reference(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        cfg = Qwen2VLTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": SECTIONS})
        cfg._attn_implementation = "eager"
        self.model = Qwen2VLTextModel(cfg)
        self.lm_head = torch.nn.Linear(64, vocab, bias=False)
        self.visual_proj = torch.nn.Linear(PATCH, 64, bias=True)

    def logits(self, ids, images, spans, positions):
        h = self.model.embed_tokens(torch.tensor([ids]))
        for pixels, (start, n) in zip(images, spans):
            h[0, start:start + n] = torch.tanh(self.visual_proj(pixels))
        pos = torch.tensor(positions)[:, None, :]
        return self.lm_head(self.model(inputs_embeds=h, position_ids=pos).last_hidden_state)[0]


def reference_positions(ids, spans, n_generated=0):
    """Qwen2-VL's rule, written as a plain loop over tokens."""
    starts = {s: n for s, n in spans}
    t_h_w, nxt, i = [], 0, 0
    while i < len(ids):
        if i in starts:
            for k in range(starts[i]):
                t_h_w.append((nxt, nxt + k // GRID, nxt + k % GRID))
            nxt += GRID
            i += starts[i]
        else:
            t_h_w.append((nxt, nxt, nxt))
            nxt += 1
            i += 1
    for _ in range(n_generated):
        t_h_w.append((nxt, nxt, nxt))
        nxt += 1
    return [list(a) for a in zip(*t_h_w)]


def png_url(seed: int) -> tuple[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (GRID, GRID, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return url, torch.from_numpy(pixels.reshape(GRID * GRID, 3).astype(np.float32) / 255.0)


@pytest.fixture(scope="module")
def mm_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_mm")
    write_tiny_tokenizer(out)
    vocab = tokenizer_vocab_size(out)
    torch.manual_seed(0)
    ref = Reference(vocab).eval()
    perturb_parameters(ref, seed=1, scale=0.3)
    weights = {f"model.{k}": v for k, v in ref.model.state_dict().items()}
    weights.update({"lm_head.weight": ref.lm_head.weight, "visual_proj.weight": ref.visual_proj.weight,
                    "visual_proj.bias": ref.visual_proj.bias})
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    image_token = 0            # "<|endoftext|>": never part of a rendered chat
    (out / "config.json").write_text(json.dumps({
        "architectures": ["MistralrsTinyMMForCausalLM"], "model_type": "mistralrs_tiny_mm", "vocab_size": vocab,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": SECTIONS}, "patch_dim": PATCH,
        "image_token_id": image_token, "hidden_act": "silu", "torch_dtype": "float32"}))
    return out, ref


def chat(parts, n=6):
    return ChatCompletionRequest(model="default", messages=[{"role": "user", "content": parts}],
                                 max_tokens=n, temperature=0.0, logprobs=True)


def ref_greedy(ref, ids, images, spans, n):
    """Greedy tokens and the log-probability of each under the reference."""
    ids, toks, lps = list(ids), [], []
    with torch.no_grad():
        for k in range(n):
            logits = ref.logits(ids, images, spans, reference_positions(ids[:len(ids) - k], spans, k))[-1]
            lp = torch.log_softmax(logits.double(), -1)
            t = int(lp.argmax())
            toks.append(t)
            lps.append(float(lp[t]))
            ids.append(t)
    return toks, lps


def prompt_of(pipe, req):
    prompt = pipe.chat_prompt(req)
    return prompt.ids, [(s.start, s.length) for s in prompt.spans], [s.data for s in prompt.spans]


def test_image_and_text_requests_batched_match_reference(mm_model):
    out, ref = mm_model
    runner = Runner(which=Which.Plain(model_id=str(out), dtype="F32"), pa_blk_size=4, seed=0)
    try:
        pipe = runner._pipeline(None)
        assert type(pipe).__name__ == "TinyMMPipeline"
        url_a, _ = png_url(1)
        url_b, _ = png_url(2)
        reqs = [chat([{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": url_a}},
                      {"type": "text", "text": "in words."}]),
                chat("Tell me a story about the Rust type system."),
                chat([{"type": "image_url", "image_url": {"url": url_b}},
                      {"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": url_a}}])]
        results = [None] * len(reqs)

        def work(i):
            results[i] = runner.send_chat_completion_request(reqs[i])
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
        with submitted_together(pipe.engine, len(reqs)):
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        for req, res in zip(reqs, results):
            ids, spans, images = prompt_of(pipe, req)
            want_toks, want_lps = ref_greedy(ref, ids, images, spans, 6)
            got = res.choices[0].logprobs.content
            got_toks = [pipe.tokenizer.encode(e.token, add_special_tokens=False) for e in got]
            assert res.usage.prompt_tokens == len(ids)
            assert [e.logprob for e in got] == pytest.approx(want_lps, abs=1e-4)
            assert res.choices[0].message.content == pipe.tokenizer.decode(want_toks)
            assert len(got_toks) == 6
        assert pipe.engine.stats["steps"] < 3 * 6          # the three requests shared steps
    finally:
        runner.shutdown()


def test_prefix_cache_separates_images_and_chunks_split_spans(mm_model):
    out, ref = mm_model
    runner = Runner(which=Which.Plain(model_id=str(out), dtype="F32"), pa_blk_size=4, seed=0)
    try:
        pipe = runner._pipeline(None)
        blocks = pipe.engine.blocks
        url_a, _ = png_url(3)
        url_b, _ = png_url(4)
        text = {"type": "text", "text": "What is in this picture, in a few words?"}

        def ask(url):
            req = chat([{"type": "image_url", "image_url": {"url": url}}, text])
            ids, spans, images = prompt_of(pipe, req)
            res = runner.send_chat_completion_request(req)
            want, want_lps = ref_greedy(ref, ids, images, spans, 6)
            assert res.choices[0].message.content == pipe.tokenizer.decode(want)
            assert [e.logprob for e in res.choices[0].logprobs.content] == pytest.approx(want_lps, abs=1e-4)
            return spans[0][0], len(ids)

        ask(url_a)
        hits = blocks.hits
        start, n = ask(url_b)         # same placeholder ids, other image: only blocks before it shared
        assert blocks.hits - hits == (start // 4) * 4
        hits = blocks.hits
        ask(url_a)                    # the same image again: every full block is reused
        assert blocks.hits - hits == ((n - 1) // 4) * 4 > start
        # Prefill chunks of 3 tokens end inside the 4-token image span: features are sliced.
        pipe.engine.scheduler.max_batch_tokens = 3
        steps = pipe.engine.stats["steps"]
        start, n = ask(png_url(5)[0])           # an image not in the cache
        assert start % 3 != 0 and pipe.engine.stats["steps"] - steps >= n // 3
    finally:
        runner.shutdown()
