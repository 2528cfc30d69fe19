"""LLaVa against transformers' ``LlavaForConditionalGeneration`` (tiny, every parameter
perturbed): image features, prefill + cached decode logits with 0, 1 and 2 images, greedy
tokens; then the same model through the Runner (``Which.VisionPlain``), an image request
batched with a text request."""
import json
import threading

from functools import partial

import pytest
import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_llava import IMAGE, write_tiny_llava  # noqa: E402
import vision_testing  # noqa: E402
from vision_testing import chat, mixed_requests, OneSequence, png_data_uri, random_image, run_concurrently  # noqa: E402

COVERS = ["LLaVa"]
TOL = 1e-4
TOKENS = (IMAGE // 7) ** 2


def prompt_with_images(image_token, pixels_list, text_ids):
    """text, then each image's placeholder run followed by more text."""
    ids, spans = list(text_ids[:3]), []
    for k, px in enumerate(pixels_list):
        spans.append(FeatureSpan(start=len(ids), length=TOKENS, content_hash=bytes([k]), data=px))
        ids += [image_token] * TOKENS + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


@torch.inference_mode()
def ref_logits(ref, ids, pixels):
    """transformers' own forward: it places image features on the image token ids."""
    kw = {"pixel_values": torch.stack(pixels)} if pixels else {}
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


@torch.inference_mode()
def ref_logits_spans(ref, ids, pixels, spans):
    """The reference fed embeddings, features put on the prompt's spans only: a random model
    may *generate* the image token id, which then is an ordinary token (transformers' own
    forward would count it as a placeholder and refuse)."""
    h = ref.get_input_embeddings()(torch.tensor([ids]))
    if pixels:
        feats = ref.model.get_image_features(pixel_values=torch.stack(pixels), vision_feature_layer=-2,
                                             vision_feature_select_strategy="default").pooler_output
        for (start, n), f in zip(spans, feats):
            h[0, start:start + n] = f
    return ref(inputs_embeds=h).logits[0].float()


@pytest.fixture(scope="module")
def loaded(tiny_llava):
    out, ref, image_token = tiny_llava
    model, _ = build_text_model(out, kind="vision")
    return model, ref, image_token


def test_image_features_match_reference(loaded):
    model, ref, _ = loaded
    px = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        theirs = torch.stack(list(ref.model.get_image_features(
            pixel_values=px, vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output))
        ours = model.image_features(px)
    assert ours.shape == (3, TOKENS, 64)
    assert max_rel_err(ours, theirs) <= TOL


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(loaded, n_images):
    model, ref, image_token = loaded
    g = torch.Generator().manual_seed(n_images)
    pixels = [torch.randn(3, IMAGE, IMAGE, generator=g) for _ in range(n_images)]
    text = torch.randint(0, image_token, (9,), generator=g).tolist()
    ids, spans = prompt_with_images(image_token, pixels, text)
    run = OneSequence(model)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, pixels))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % image_token)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq, pixels)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"

    # Greedy: 12 tokens, the reference recomputing the whole sequence each step.
    run, seq, ours, theirs = OneSequence(model), list(ids), [], []
    logits = run.step(ids, spans)[-1]
    for _ in range(12):
        t = int(logits.argmax())
        ours.append(t)
        logits = run.step([t])[-1]
    where = [(s.start, s.length) for s in spans]
    for _ in range(12):
        theirs.append(int(ref_logits_spans(ref, seq, pixels, where)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


@pytest.mark.parametrize("layer,strategy", [([-3, -1], "full"), (0, "default")])
def test_feature_layer_and_strategy_variants(tmp_path, layer, strategy):
    """A list of feature layers (concatenated) with the CLS kept, and the embeddings layer."""
    out, ref, image_token = write_tiny_llava(tmp_path, feature_layer=layer, strategy=strategy)
    model, _ = build_text_model(out, kind="vision")
    assert model.tokens_per_image == TOKENS + (strategy == "full")
    px = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        theirs = torch.stack(list(ref.model.get_image_features(
            pixel_values=px, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
            output_hidden_states=True).pooler_output))
        ours = model.image_features(px)
    assert max_rel_err(ours, theirs) <= TOL


def test_hub_checkpoint_layout_loads(tmp_path, loaded):
    """Hub checkpoints (before transformers' module rename) nest the tower under
    ``vision_tower.vision_model.``; both layouts load to the same model."""
    from safetensors.torch import load_file, save_file
    model, ref, image_token = loaded
    src = tmp_path / "hub"
    out, _, _ = write_tiny_llava(src)
    weights = load_file(str(out / "model.safetensors"))
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    save_file(renamed, str(out / "model.safetensors"))
    hub_model, _ = build_text_model(out, kind="vision")
    px = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.inference_mode():
        assert torch.equal(hub_model.image_features(px), model.image_features(px))


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny_llava):
    from mistralrs import Runner, VisionArchitecture, Which
    out, ref, _ = tiny_llava
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.LLaVa, dtype="F32"),
               pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


def check_against_reference(pipe, ref, req, res, n=6):
    return vision_testing.check_against_reference(pipe, partial(ref_logits_spans, ref), req, res, n)


def test_runner_batches_image_and_text_requests(runner, tiny_llava):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, image_token = tiny_llava
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(random_image(1)), png_data_uri(random_image(2, size=(20, 50)))
    reqs = mixed_requests(url_a, url_b)
    steps = pipe.engine.stats["steps"]
    results = run_concurrently(runner, reqs)
    prompts = [check_against_reference(pipe, ref, q, r) for q, r in zip(reqs, results)]
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    assert all(p.ids.count(image_token) == TOKENS * len(p.spans) for p in prompts)
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_runner_chunked_prefill_splits_an_image_span(runner, tiny_llava):
    _, ref, _ = tiny_llava
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 5                 # chunks end inside the 16-token image span
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(random_image(7))}}])
        steps = pipe.engine.stats["steps"]
        prompt = check_against_reference(pipe, ref, req, runner.send_chat_completion_request(req))
        assert prompt.spans[0].start % 5 != 0
        assert pipe.engine.stats["steps"] - steps >= len(prompt.ids) // 5
    finally:
        sched.max_batch_tokens = old


def test_missing_preprocessor_config_is_one_clear_error(tmp_path):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = write_tiny_llava(tmp_path)
    settings = json.loads((out / "preprocessor_config.json").read_text())
    (out / "preprocessor_config.json").unlink()
    # LLaVa's processor_config.json holds only the processor's own keys: not image settings.
    (out / "processor_config.json").write_text(json.dumps({"patch_size": 7, "processor_class": "LlavaProcessor"}))
    which = Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.LLaVa, dtype="F32")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json and processor_config.json"):
        Runner(which=which)
    # Newer exports nest the image settings in processor_config.json.
    (out / "processor_config.json").write_text(json.dumps({"image_processor": settings}))
    Runner(which=which).shutdown()


def test_same_pixels_from_another_source_share_the_prefix_cache(runner, tiny_llava, tmp_path):
    _, ref, _ = tiny_llava
    pipe = runner._pipeline(None)
    blocks = pipe.engine.blocks
    img = random_image(11)
    path = tmp_path / "same.png"
    img.save(path)
    text = {"type": "text", "text": "What is in this picture?"}
    first = chat([{"type": "image_url", "image_url": {"url": png_data_uri(img)}}, text])
    prompt = check_against_reference(pipe, ref, first, runner.send_chat_completion_request(first))
    hits = blocks.hits
    again = chat([{"type": "image_url", "image_url": {"url": path.as_uri()}}, text])
    check_against_reference(pipe, ref, again, runner.send_chat_completion_request(again))
    assert blocks.hits - hits == ((len(prompt.ids) - 1) // 4) * 4      # every full block reused
    hits = blocks.hits
    other = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(12))}}, text])
    check_against_reference(pipe, ref, other, runner.send_chat_completion_request(other))
    assert blocks.hits - hits == (prompt.spans[0].start // 4) * 4      # only blocks before the image


def test_pipeline_text_only_unchanged_and_bad_parts_name_the_part(runner, tmp_path):
    from mistralrs_core.pipeline.text import TextPipeline
    pipe = runner._pipeline(None)
    plain = chat([{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}])
    assert pipe.chat_prompt(plain).ids == TextPipeline.chat_prompt(pipe, chat("Hello there")).ids
    assert pipe.chat_prompt(plain).spans == []
    bad = chat([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:,nothing"}}])
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[1\]\.image_url: not a decodable image"):
        pipe.chat_prompt(bad)
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]: unsupported content part type 'audio'"):
        pipe.chat_prompt(chat([{"type": "audio", "audio": "x"}]))
    # LLaVa cannot hear: an audio part is refused by name, before any decoding.
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]\.audio_url: this model does not take audio"):
        pipe.chat_prompt(chat([{"type": "audio_url", "audio_url": {"url": "data:,x"}}]))
    # A template that drops image parts would silently lose the image: refused instead.
    sneaky = chat([{"type": "text", "text": "<image> twice"},
                   {"type": "image_url", "image_url": {"url": png_data_uri(random_image(3))}}])
    with pytest.raises(ValueError, match="2 image placeholder"):
        pipe.chat_prompt(sneaky)
    # Through the Runner the error reaches the caller as the same ValueError.
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[1\]\.image_url"):
        runner.send_chat_completion_request(bad)


# llava-hf/llava-1.5-7b-hf's chat_template.json: content is always iterated as parts
# (images first), with transformers' {% generation %} tag around assistant text.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_hub_llava_template_gets_parts(runner):
    from mistralrs_core.tokenization.chat_template import ChatTemplate
    from mistralrs_core.tokenization.prompt import encode_prompt
    from mistralrs_arch_vision.inputs import load_image
    pipe = runner._pipeline(None)
    old, pipe.template = pipe.template, ChatTemplate(LLAVA15_TEMPLATE, "llava-1.5 chat_template.json")
    try:
        url = png_data_uri(random_image(4))
        got = pipe.chat_prompt(chat([{"type": "text", "text": "What is it?"},
                                     {"type": "image_url", "image_url": {"url": url}}]))
        image = load_image(url, where="x")
        want = pipe.expand_images(encode_prompt(pipe.tokenizer, "USER: <image>\nWhat is it? ASSISTANT:"), [image])
        assert got.ids == want.ids
        assert [(s.start, s.length, s.content_hash) for s in got.spans] == \
            [(s.start, s.length, s.content_hash) for s in want.spans]
        assert got.spans[0].length == TOKENS
        # Text-only parts keep their list form, so this template still renders the text.
        text_only = pipe.chat_prompt(chat([{"type": "text", "text": "Hi"}]))
        assert text_only.ids == encode_prompt(pipe.tokenizer, "USER: Hi ASSISTANT:")
    finally:
        pipe.template = old


def test_arch_naming_another_family_is_refused(tiny_llava):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny_llava
    with pytest.raises(ValueError, match=r"^arch: no installed vision family 'MuseGlimmer'; known vision families: .*LLaVa"):
        Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.MuseGlimmer, dtype="F32"))


def test_bad_images_fail_alone_while_a_concurrent_image_request_completes(runner, tiny_llava, tmp_path):
    """Each broken input is one ValueError for its own request; an image request in flight
    at the same time finishes with exactly the reference's answer."""
    import base64 as b64
    _, ref, _ = tiny_llava
    pipe = runner._pipeline(None)
    good = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(5))}},
                 {"type": "text", "text": "Describe it in many words."}], n=24)
    box = {}
    worker = threading.Thread(target=lambda: box.update(res=runner.send_chat_completion_request(good)))
    truncated = b64.b64decode(png_data_uri(random_image(6)).split(",", 1)[1])[:40]
    (tmp_path / "cut.png").write_bytes(truncated)
    bad_urls = {"not an image": "data:text/plain;base64," + b64.b64encode(b"hello").decode(),
                "truncated PNG": (tmp_path / "cut.png").as_uri(),
                "unreachable URL": "http://127.0.0.1:9/none.png",
                "missing file": str(tmp_path / "absent.png")}
    worker.start()
    for why, url in bad_urls.items():
        with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]\.image_url"):
            runner.send_chat_completion_request(chat([{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": why}]))
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]\.video_url: this model does not take video"):
        runner.send_chat_completion_request(chat([{"type": "video_url", "video_url": {"url": "x"}}]))
    worker.join(timeout=120)
    check_against_reference(pipe, ref, good, box["res"], n=24)
