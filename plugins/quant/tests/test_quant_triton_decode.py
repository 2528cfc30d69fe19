"""The Triton paged-attention kernel behind the core's decode-attention seam, in real models.

Tiny random models decode three sequences of different lengths in one batch through the
model runner, once with ``MISTRALRS_DECODE_ATTENTION=triton`` (the kernel, interpreted on CPU)
and once with ``torch``: the logits agree to float32 rounding at every decode step, and the
kernel served every layer of every decode step (calls counted). Families: Llama (GQA; also
with the FP8 cache), Gemma 2 (alternating sliding-window/global layers, logit soft-capping)
and GPT-OSS (attention sinks, sliding-window/global layers, MoE).
Prefill steps are not pure decode and stay on the torch path in both runs.
"""
import pytest
import torch

pytest.importorskip("triton")

from mistralrs_core.engine.model_runner import ModelRunner  # noqa: E402
from mistralrs_core.engine.step import record  # noqa: E402
from mistralrs_core.layers.attention import FP8_CACHE_DTYPE  # noqa: E402
from mistralrs_core.layers.decode_kernels import ENV  # noqa: E402
from mistralrs_core.testing.parity import load_for_test, max_rel_err, perturb_parameters, save_reference  # noqa: E402
from mistralrs_core.testing.tiny import write_random_llama  # noqa: E402
from mistralrs_quant.kernels.triton import paged_attention  # noqa: E402

if type(paged_attention._paged_decode_kernel).__name__ != "InterpretedFunction":
    # The root conftest sets TRITON_INTERPRET=1 before anything imports triton; a session
    # that imported it earlier cannot run the kernel on CPU.
    pytest.skip("triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

PROMPTS = [[5, 17, 3, 99, 42], [7, 250, 11, 64, 2, 8, 31, 90, 120], [13, 200]]
# Scrambled; each sequence owns its blocks. Block 0 is in use, as the engine's allocator hands
# it out first: the torch path reads it through the padded block tables, and an uninitialised
# (never zeroed) block could hold NaN bits that survive a 0 attention weight.
BLOCKS = [[3, 11], [9, 0, 14], [7]]
DECODE = [[40, 41, 42], [50, 51, 52], [60, 61, 62]]  # fed tokens per sequence per step
BOUND = 1e-5  # float32: the kernel differs from the torch path only in summation order


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = write_random_llama(tmp_path_factory.mktemp("llama"), hidden=32, layers=2, heads=4, kv_heads=2,
                           intermediate=64, vocab=300)
    return load_for_test(d, "Llama")


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                       attn_logit_softcapping=0.5, final_logit_softcapping=30.0, query_pre_attn_scalar=8)
    torch.manual_seed(0)
    ref = Gemma2ForCausalLM(cfg).float().eval()
    perturb_parameters(ref)
    return load_for_test(save_reference(ref, tmp_path_factory.mktemp("gemma2")), "Gemma2")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig(vocab_size=300, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       head_dim=8, sliding_window=4, swiglu_limit=0.3, eos_token_id=None)
    torch.manual_seed(0)
    ref = GptOssForCausalLM(cfg).float().eval()
    perturb_parameters(ref)
    return load_for_test(save_reference(ref, tmp_path_factory.mktemp("gpt_oss")), "GptOss")


def _run(model, mode, monkeypatch, cache_dtype):
    """Prefill the three prompts together, then three batched decode steps: per decode step
    the [3, vocab] logits, and how many times the kernel ran."""
    calls = []
    real = paged_attention.paged_decode_attention
    monkeypatch.setattr(paged_attention, "paged_decode_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv(ENV, mode)
    runner = ModelRunner(model, num_blocks=16, block_size=4, device="cpu", cache_dtype=cache_dtype)
    runner.run([record(p, 0, b) for p, b in zip(PROMPTS, BLOCKS)])
    assert not calls, "a prefill step reached the decode kernel"
    steps = []
    for s in range(len(DECODE[0])):
        steps.append(runner.run([record([DECODE[i][s]], len(p) + s, BLOCKS[i]) for i, p in enumerate(PROMPTS)]))
    return steps, len(calls)


@pytest.mark.parametrize("family,cache_dtype", [("llama", torch.float32), ("llama", FP8_CACHE_DTYPE),
                                                ("gemma2", torch.float32), ("gpt_oss", torch.float32)],
                         ids=["llama", "llama-fp8", "gemma2", "gpt_oss"])
def test_decode_through_kernel_matches_torch(family, cache_dtype, request, monkeypatch):
    model = request.getfixturevalue(family)
    layers = len(model.kv_cache_specs())
    torch_steps, torch_calls = _run(model, "torch", monkeypatch, cache_dtype)
    kernel_steps, kernel_calls = _run(model, "triton", monkeypatch, cache_dtype)
    assert torch_calls == 0
    assert kernel_calls == layers * len(kernel_steps)      # every layer of every decode step
    errs = [max_rel_err(a, b) for a, b in zip(kernel_steps, torch_steps)]
    print(f"{family} ({cache_dtype}): max relative logit error per decode step {errs}")
    assert max(errs) <= BOUND
    assert all(a.shape == (3, model.cfg.vocab_size) for a in kernel_steps)


def test_families_exercise_the_kernel_options(gemma2, gpt_oss):
    """The runs above pass the kernel a sliding window and soft-capping (Gemma 2) and sinks
    with a sliding window (GPT-OSS); a config change must not silently drop them."""
    g2 = [layer.self_attn for layer in gemma2.model.layers]
    assert [a.sliding_window for a in g2] == [4, None] and {a.cfg.attn_softcap for a in g2} == {0.5}
    oss = [layer.self_attn for layer in gpt_oss.model.layers]
    assert [a.sliding_window for a in oss] == [4, None]
    assert all(a.sinks is not None and float(a.sinks.abs().max()) > 0 for a in oss)


def test_without_triton_the_torch_path_serves(llama, monkeypatch):
    """triton missing (or MISTRALRS_TRITON=0): the kernel declines, the core runs torch."""
    from mistralrs_quant.kernels.triton import dispatch
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    steps, calls = _run(llama, "triton", monkeypatch, torch.float32)
    ref, _ = _run(llama, "torch", monkeypatch, torch.float32)
    assert calls == 0
    assert all(torch.equal(a, b) for a, b in zip(steps, ref))
