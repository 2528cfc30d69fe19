"""Llama 4 against transformers (tiny, every parameter perturbed): the MoE text decoder with
chunked attention on rope layers, L2 q/k norm, NoPE layers with temperature tuning (prompts
longer than the chunk, decode steps crossing chunk borders); the vision tower on tiles."""
import pytest
import torch

from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from test_llava import Ours  # noqa: E402
from tiny_llama4 import IMAGE, write_tiny_llama4  # noqa: E402

COVERS = ["Llama4"]
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama4(tmp_path_factory.mktemp("tiny_llama4"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


@torch.inference_mode()
def ref_embeds_logits(ref, ids, spans=()):
    h = ref.get_input_embeddings()(torch.tensor([ids]))
    for s in spans:
        feats = ref.get_image_features(pixel_values=s.data.tiles).pooler_output.reshape(-1, h.shape[-1])
        at = [s.start + i for i, t in enumerate(s.data.token_ids) if t == ref.config.image_token_index]
        h[0, at] = feats
    return ref(inputs_embeds=h).logits[0].float()


def test_text_prefill_and_decode_match_reference(loaded):
    model, ref, ids_of = loaded
    vocab = min(ids_of.values())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (13,), generator=g).tolist()      # > 2 chunks of 5
    run = Ours(model)
    worst = max_rel_err(run.step(ids), ref_embeds_logits(ref, ids))
    seq = list(ids)
    for i in range(6):                                              # crosses the chunk border at 15
        seq.append((seq[-1] * 7 + 3 + i) % vocab)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_embeds_logits(ref, seq)[-1]))
    assert worst <= TOL, f"relative logit error {worst:.2e}"


def test_text_chunked_prefill_matches_reference(loaded):
    """The prompt in uneven pieces through the cache (queries at non-zero starts)."""
    model, ref, ids_of = loaded
    vocab = min(ids_of.values())
    ids = torch.randint(0, vocab, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    run, outs = Ours(model), []
    for a, b in ((0, 3), (3, 11), (11, 17)):
        outs.append(run.step(ids[a:b]))
    assert max_rel_err(torch.cat(outs), ref_embeds_logits(ref, ids)) <= TOL


def test_text_greedy_matches_reference(loaded):
    model, ref, ids_of = loaded
    vocab = min(ids_of.values())
    ids = torch.randint(0, vocab, (8,), generator=torch.Generator().manual_seed(2)).tolist()
    run, ours, seq, theirs = Ours(model), [], list(ids), []
    logits = run.step(ids)[-1]
    for _ in range(10):
        ours.append(int(logits.argmax()))
        logits = run.step([ours[-1]])[-1]
    for _ in range(10):
        theirs.append(int(ref_embeds_logits(ref, seq)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


# --------------------------------------------------------------------------- tower + projector
def test_image_features_match_reference(loaded):
    model, ref, _ = loaded
    tiles = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model.image_features(tiles)
        theirs = ref.get_image_features(pixel_values=tiles).pooler_output
    assert model.vision_model.cfg.tokens_per_tile == 4 and theirs.shape == (3, 4, 64)
    assert max_rel_err(ours, theirs.reshape(-1, 64)) <= TOL


def test_tower_hidden_states_match_reference(loaded):
    """Before the adapter: the encoder with its 2-D rope and the class token."""
    model, ref, _ = loaded
    tiles = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    seen = {}
    hook = ref.vision_model.vision_adapter.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    with torch.inference_mode():
        ref.vision_model(tiles)
        mine = {}
        h = model.vision_model.vision_adapter.register_forward_hook(lambda m, a, o: mine.update(x=a[0]))
        model.vision_model(tiles)
    hook.remove(), h.remove()
    assert max_rel_err(mine["x"], seen["x"]) <= TOL
