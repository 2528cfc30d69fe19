"""Qwen3-VL-MoE against transformers' ``Qwen3VLMoeForConditionalGeneration`` (tiny, every
parameter perturbed; 4 experts, top 2, one dense layer): prefill + cached decode logits with
0 and 2 images, a prefill chunked inside an image, the hub's transposed expert stacks and
transformers 5's own, and the Runner batching an image request with a text request. The
tower, processor and positions are Qwen3-VL's (``test_qwen3_vl.py``)."""

import pytest
import torch

from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from test_qwen3_vl import IMAGES, Seqs, _check, _legacy_copy, build_prompt, image, ref_logits  # noqa: E402
from tiny_qwen3_vl import PREPROCESSOR, tokenizer_of, write_tiny_qwen3_vl  # noqa: E402
from vision_testing import chat, png_data_uri, run_concurrently  # noqa: E402

from mistralrs_arch_vision.qwen2_vl import Qwen2VLProcessor  # noqa: E402
from mistralrs_arch_vision.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration  # noqa: E402

COVERS = ["Qwen3VLMoE"]
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl_moe"), moe=True)


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


@pytest.fixture(scope="module")
def proc(loaded):
    return Qwen2VLProcessor.from_pretrained(model=loaded[0], hf_config={}, preprocessor_config=PREPROCESSOR,
                                            tokenizer=tokenizer_of(loaded[2]))


def test_layers_are_sparse_except_mlp_only_layers(loaded):
    from mistralrs_core.layers.moe import SparseMoE
    model = loaded[0]
    assert isinstance(model, Qwen3VLMoeForConditionalGeneration)
    assert [isinstance(layer.mlp, SparseMoE) for layer in model.model.layers] == [True, False, True]
    assert model.model.layers[0].mlp.experts.num_experts == 4


@pytest.mark.parametrize("n_images", [0, 2])   # 1 image: test_qwen3_vl.py (the same tower)
def test_prefill_and_decode_logits_match_reference(loaded, proc, n_images):
    model, ref, ids_of = loaded
    img_tok = ids_of["<|vision_start|>"]
    g = torch.Generator().manual_seed(n_images)
    images = [image(*IMAGES[0], seed=1), image(*IMAGES[1], seed=2)][:n_images]
    ids, spans = build_prompt(proc, ids_of, images, torch.randint(0, img_tok, (9,), generator=g).tolist())
    run = Seqs(model)
    run.add(0, ids, spans)
    worst = max_rel_err(run.step((0, len(ids)))[0], ref_logits(ref, ids, spans))
    seq = list(ids)
    for i in range(3):
        seq.append((seq[-1] * 7 + 3 + i) % img_tok)
        run.push(0, seq[-1])
        worst = max(worst, max_rel_err(run.step((0, 1))[0][-1], ref_logits(ref, seq, spans)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"


def test_prefill_chunked_inside_an_image_matches_reference(loaded, proc):
    model, ref, ids_of = loaded
    ids, spans = build_prompt(proc, ids_of, [image(*IMAGES[0], seed=3)], list(range(20, 29)))
    run = Seqs(model)
    run.add(0, ids, spans)
    cut = spans[0].start + 5
    got = torch.cat([run.step((0, cut))[0], run.step((0, len(ids) - cut))[0]])
    assert max_rel_err(got, ref_logits(ref, ids, spans)) <= TOL


def test_hub_layout_transposed_expert_stacks_load(tiny, loaded, proc, tmp_path):
    """The hub stores gate_up_proj [E, H, 2I] and down_proj [E, I, H] (transformers 5 writes
    them the other way round, as the module holds them)."""
    from safetensors.torch import load_file, save_file
    model, _, ids_of = loaded
    hub = _legacy_copy(tiny, tmp_path, lambda k: k)
    tensors = load_file(hub / "model.safetensors")
    stacks = [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(stacks) == 4 and tensors[stacks[0]].shape[1] != tensors[stacks[0]].shape[2]
    save_file({k: v.transpose(1, 2).contiguous() if k in stacks else v for k, v in tensors.items()},
              hub / "model.safetensors")
    other, _ = build_text_model(hub, kind="vision")
    ids, spans = build_prompt(proc, ids_of, [image(*IMAGES[1], seed=4)], list(range(9)))
    a, b = Seqs(model), Seqs(other)
    a.add(0, ids, spans)
    b.add(0, ids, spans)
    assert torch.equal(a.step((0, len(ids)))[0], b.step((0, len(ids)))[0])


def test_bad_expert_stack_shape_is_clear(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    bad = _legacy_copy(tiny, tmp_path, lambda k: k)
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if k.endswith("experts.down_proj"))
    tensors[key] = tensors[key][:, :, :-1].contiguous()
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"experts\.down_proj: shape \(4, 64, 23\) is neither"):
        build_text_model(bad, kind="vision")


def test_runner_batches_image_and_text_requests(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    _, ref, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(tiny[0]), arch=VisionArchitecture.Qwen3VLMoE, dtype="F32"),
               pa_blk_size=4, seed=0)
    try:
        pipe = r._pipeline(None)
        reqs = [chat([{"type": "image_url", "image_url": {"url": png_data_uri(image(70, 30, seed=5))}},
                      {"type": "text", "text": "Describe it."}]),
                chat("Tell me a story.")]
        for q, res in zip(reqs, run_concurrently(r, reqs)):
            _check(pipe, ref, q, res)
    finally:
        r.shutdown()
