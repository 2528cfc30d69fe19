"""Phi-3-vision against a reference assembled from transformers' ``CLIPVisionModel`` +
``Phi3ForCausalLM`` and the hub code's HD transform / projector (``tiny_phi3v.py``), every
parameter perturbed: the HD image processor and the prompt's image tokens against the hub
processor's algorithm (written below from ``image_processing_phi3_v.py`` /
``processing_phi3_v.py``), packed image features, prefill + cached decode logits with 0, 1
and 2 images of different sizes and aspect ratios (LongRoPE's short and long factors), greedy
tokens, the Microsoft checkpoint layout, then the Runner: image + text requests batched,
32 greedy tokens, bad inputs failing alone."""
import json
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

import vision_testing  # noqa: E402
from vision_testing import chat, OneSequence, png_data_uri, run_concurrently  # noqa: E402
from tiny_phi3v import CLIP_MEAN, CLIP_STD, NUM_CROPS, PREPROCESSOR, write_tiny_phi3v  # noqa: E402

from mistralrs_arch_vision.processors.phi3v import Phi3VImageProcessor, hd_size  # noqa: E402

COVERS = ["Phi3V"]
TOL = 1e-4
# (width, height): wide, tall, smaller than a CLIP patch, square, exactly one crop, larger
# than every crop (downscaled), a wide one needing 4 crops in a row, a tall one in a column
SHAPES = [(50, 23), (20, 61), (9, 13), (60, 60), (336, 336), (900, 700), (400, 60), (31, 200)]


def image(w, h, seed=0):
    rng = np.random.default_rng(seed + w * 1000 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- the hub's algorithm
# image_processing_phi3_v.py, step for step; torchvision's resize/pad of a PIL image are
# Pillow's bilinear resize and ImageOps.expand, ToTensor divides by 255 in float32.
def hub_hd_transform(img, hd_num):
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    tar = int(np.ceil(new_h / 336) * 336)
    top = int((tar - new_h) / 2)
    img = ImageOps.expand(img, border=(0, top, 0, tar - new_h - top), fill=(255, 255, 255))
    return img.transpose(Image.TRANSPOSE) if trans else img


def hub_preprocess(images, num_crops=NUM_CROPS):
    """-> pixel_values [n, num_crops + 1, 3, 336, 336], image_sizes, num_img_tokens."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    hd = [torch.from_numpy(np.array(hub_hd_transform(im.convert("RGB"), num_crops))).permute(2, 0, 1).float().div(255)
          .sub(mean).div(std) for im in images]
    glb = [F.interpolate(x.unsqueeze(0).float(), size=(336, 336), mode="bicubic") for x in hd]
    shapes = [[x.size(1), x.size(2)] for x in hd]
    num_img_tokens = [int(((h // 336) * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12) for h, w in shapes]
    crops = [x.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
             for x, (h, w) in zip(hd, shapes)]
    crops = [torch.cat([g, c]) for g, c in zip(glb, crops)]
    crops = [torch.cat([c, torch.zeros(num_crops + 1 - c.shape[0], 3, 336, 336)]) for c in crops]
    return torch.stack(crops), shapes, num_img_tokens


def hub_num_tokens_from_size(width, height, hd_num=NUM_CROPS):
    """calc_num_image_tokens_from_image_size (via calc_hd_transform_size), as published."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    new_h = int(np.ceil(new_h / 336) * 336)
    if transposed:
        new_w, new_h = new_h, new_w
    return int((new_h // 336 * new_w // 336 + 1) * 144 + 1 + (new_h // 336 + 1) * 12)


def hub_prompt_ids(tokenizer, text, num_img_tokens):
    """processing_phi3_v.py's _convert_images_texts_to_inputs: each piece between tags
    tokenized on its own (special tokens added), tag N -> num_img_tokens[N-1] ids of -N."""
    pattern = r"<\|image_\d+\|>"
    chunks = [tokenizer(chunk).input_ids for chunk in re.split(pattern, text)]
    image_ids = [int(s.split("|")[1].split("_")[-1]) for s in re.findall(pattern, text)]
    pads = [[-iid] * num_img_tokens[iid - 1] for iid in image_ids]
    if len(chunks) > len(pads):
        pads.append([])
    return [t for chunk, pad in zip(chunks, pads) for t in chunk + pad]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_phi3v(tmp_path_factory.mktemp("tiny_phi3v"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids["<|image|>"]


# --------------------------------------------------------------------------- processor
@pytest.mark.parametrize("shape", SHAPES)
def test_processor_matches_the_hub_algorithm(shape):
    img = image(*shape)
    want, sizes, counts = hub_preprocess([img])
    got = Phi3VImageProcessor.from_config(PREPROCESSOR)(img)
    n = got.crops.shape[0]
    assert got.crops.dtype == torch.float32 and got.crops.shape[1:] == (3, 336, 336)
    assert torch.equal(got.crops, want[0, :n]), float((got.crops - want[0, :n]).abs().max())
    assert not want[0, n:].any()                  # the hub's padding crops: never looked at
    assert list(got.image_size) == sizes[0] and hd_size(*shape, NUM_CROPS) == tuple(sizes[0])
    proc = Phi3VImageProcessor.from_config(PREPROCESSOR)
    assert proc.num_tokens(*shape) == counts[0] == hub_num_tokens_from_size(*shape)


def test_token_count_formula_over_many_sizes():
    for crops in (1, 4, 16):
        proc = Phi3VImageProcessor(num_crops=crops)
        for w in range(7, 3000, 211):
            for h in range(5, 3000, 197):
                assert proc.num_tokens(w, h) == hub_num_tokens_from_size(w, h, crops), (w, h, crops)


def test_processor_config_and_non_rgb():
    proc = Phi3VImageProcessor.from_config({**PREPROCESSOR, "num_crops": 16, "image_mean": [0.5] * 3,
                                            "image_std": [0.25] * 3})
    assert proc.num_crops == 16 and proc.image_mean == (0.5,) * 3
    rgba = image(30, 40).convert("RGBA")
    assert torch.equal(Phi3VImageProcessor()(rgba).crops, Phi3VImageProcessor()(rgba.convert("RGB")).crops)
    for bad in (0, -1, 2.5, "4", True):
        with pytest.raises(ValueError, match="num_crops must be a positive integer"):
            Phi3VImageProcessor.from_config({**PREPROCESSOR, "num_crops": bad})
    with pytest.raises(ValueError, match="image_std must have 3 entries"):
        Phi3VImageProcessor.from_config({**PREPROCESSOR, "image_std": [0.5, 0.5]})
    with pytest.raises(ValueError, match="too elongated"):
        Phi3VImageProcessor(num_crops=4)(image(3000, 2))      # the reference fails on it too


def test_prompt_ids_match_the_hub_processor(loaded, tiny):
    """Pieces between tags tokenized one by one with BOS each, as the hub does; tags out of
    order and a repeated tag included."""
    from transformers import PreTrainedTokenizerFast
    from mistralrs_arch_vision.inputs import LoadedImage
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    from mistralrs_arch_vision.phi3v import Phi3VProcessor
    model, _, image_token = loaded
    out, _, _ = tiny
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), bos_token="<s>")
    proc = Phi3VProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                          tokenizer=Tokenizer.from_dir(out))
    imgs = [image(50, 23), image(20, 61)]
    loaded_imgs = [LoadedImage(im, bytes([k])) for k, im in enumerate(imgs)]
    _, _, counts = hub_preprocess(imgs)
    for text in ["<|user|>\n<|image_1|>\n<|image_2|>\nWhat differs?<|end|>\n<|assistant|>\n",
                 "<|user|>\n<|image_2|> then <|image_1|> and <|image_2|> again<|end|>\n<|assistant|>\n"]:
        want = hub_prompt_ids(theirs, text, counts)
        got = proc.expand_prompt(text, loaded_imgs)
        assert got.ids == [image_token if t < 0 else t for t in want]
        assert got.ids.count(theirs.bos_token_id) == text.count("<|image_") + 1
        tags = [int(t) for t in re.findall(r"<\|image_(\d+)\|>", text)]
        assert [(s.length, s.content_hash) for s in got.spans] == [(counts[t - 1], bytes([t - 1])) for t in tags]
        assert all(got.ids[s.start:s.end] == [image_token] * s.length for s in got.spans)
        assert all(want[s.start] < 0 and want[s.start - 1] >= 0 for s in got.spans)


# --------------------------------------------------------------------------- model
def pixels_of(shapes, seed=0):
    proc = Phi3VImageProcessor.from_config(PREPROCESSOR)
    return [proc(image(w, h, seed)) for w, h in shapes]


def ref_features(ref, pixels):
    """The hub embedding's input, zero crops padding every image to the same count -> all
    images' rows. (The hub pads to num_crops + 1; it never reads the padding's features, so
    padding only to the most crops of the batch saves tower time and changes nothing.)"""
    padded = torch.zeros(len(pixels), max(p.crops.shape[0] for p in pixels), 3, 336, 336)
    for i, p in enumerate(pixels):
        padded[i, :p.crops.shape[0]] = p.crops
    return ref.image_features(padded, [p.image_size for p in pixels])


def test_packed_image_features_match_reference(loaded):
    model, ref, _ = loaded
    pixels = pixels_of([(50, 23), (20, 61), (9, 13), (336, 336)])     # 1x2, 3x1, 2x2, 1x1 crops
    with torch.inference_mode():
        ours = model.encode_features([FeatureSpan(start=0, length=0, content_hash=b"", data=p) for p in pixels])
    theirs = ref_features(ref, pixels)
    assert [o.shape[0] for o in ours] == [model.tokens_for(*p.image_size) for p in pixels]
    assert max_rel_err(torch.cat(ours), theirs) <= TOL


def prompt_with_images(image_token, pixels, text_ids, model):
    ids, spans = list(text_ids[:3]), []
    for k, px in enumerate(pixels):
        n = model.tokens_for(*px.image_size)
        spans.append(FeatureSpan(start=len(ids), length=n, content_hash=bytes([k]), data=px))
        ids += [image_token] * n + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


def check_logits_and_greedy(model, ref, image_token, shapes, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = pixels_of(shapes, seed=seed)
    text = torch.randint(0, image_token, (9,), generator=g).tolist()
    ids, spans = prompt_with_images(image_token, pixels, text, model)
    feats = ref_features(ref, pixels) if pixels else None
    where = [(s.start, s.length) for s in spans]
    run = OneSequence(model, num_blocks=640)
    worst = max_rel_err(run.step(ids, spans), ref.logits(ids, feats, where))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % image_token)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref.logits(seq, feats, where)[-1]))
    assert worst <= TOL, f"{shapes}: relative logit error {worst:.2e}"

    run, seq, ours, theirs = OneSequence(model, num_blocks=640), list(ids), [], []
    logits = run.step(ids, spans)[-1]
    for _ in range(10):
        ours.append(int(logits.argmax()))
        logits = run.step([ours[-1]])[-1]
    for _ in range(10):
        theirs.append(int(ref.logits(seq, feats, where)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs
    return len(ids)


IMAGE_SETS = {0: [], 1: [(50, 23)], 2: [(20, 61), (40, 19)]}     # 1x2; 3x1 and 1x2 crops


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(loaded, n_images):
    model, ref, image_token = loaded
    check_logits_and_greedy(model, ref, image_token, IMAGE_SETS[n_images], n_images)


def test_glb_sub_order_other_layer_and_long_rope_factors(tmp_path):
    """The other HD order, the last CLIP layer, Phi-3.5's "longrope" spelling, and prompts
    past original_max_position_embeddings (LongRoPE's long factors in both models)."""
    out, ref, ids = write_tiny_phi3v(tmp_path, order="glb_sub", layer_idx=-1, original_max=256, rope="longrope",
                                     seed=3)
    model, _ = build_text_model(out, kind="vision")
    assert model.image_embed.order == "glb_sub" and model.vision_tower.built_layers == 3
    assert model.cfg.rope.rope_type == "longrope"
    assert check_logits_and_greedy(model, ref, ids["<|image|>"], [(60, 60)], 5) > 256


def test_microsoft_layout_with_shared_wte_loads(tmp_path, loaded):
    """The hub checkpoint may carry the embedding a second time under the image embedding
    (``vision_embed_tokens.wte``), and the whole CLIP incl. its unused last layer and
    ``post_layernorm``; all of it loads, and nothing past the feature layer is built."""
    from safetensors.torch import load_file, save_file
    model, _, _ = loaded
    out, _, _ = write_tiny_phi3v(tmp_path)
    weights = load_file(str(out / "model.safetensors"))
    assert "model.vision_embed_tokens.img_processor.vision_model.post_layernorm.weight" in weights
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.2.mlp.fc1.weight" in weights
    weights["model.vision_embed_tokens.wte.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(out / "model.safetensors"))
    other, _ = build_text_model(out, kind="vision")
    assert len(other.vision_tower.encoder.layers) == 2
    assert torch.equal(other.image_embed.sub_GN, model.image_embed.sub_GN)


@pytest.mark.parametrize("change,match", [
    ({"embd_layer": {"use_hd_transform": True, "with_learnable_separator": True, "projection_cls": "linear"}},
     "embd_layer.projection_cls: 'linear'"),
    ({"embd_layer": {"projection_cls": "mlp"}}, "embd_layer: only the HD transform"),
    ({"embd_layer": {"use_hd_transform": True, "with_learnable_separator": True, "projection_cls": "mlp",
                     "hd_transform_order": "sideways"}}, "embd_layer.hd_transform_order: 'sideways'"),
    ({"img_processor": {"name": "siglip"}}, "img_processor.name: 'siglip'"),
    ({"img_processor": "clip"}, "img_processor must be an object"),
    ({"img_processor": {"name": "clip_vision_model", "image_dim_out": 64}}, "img_processor.image_dim_out: 64"),
    ({"img_processor": {"name": "clip_vision_model", "type_feature": "cls_patch"}},
     "img_processor.type_feature: 'cls_patch'"),
    ({"vision_config": {"image_size": 224}}, "vision_config.image_size: 224"),
])
def test_unsupported_configs_are_refused(tmp_path, tiny, change, match):
    import shutil
    out, _, _ = tiny
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(out / name, tmp_path / name)
    (tmp_path / "model.safetensors").symlink_to(out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    for k, v in change.items():
        cfg[k] = {**cfg[k], **v} if k == "vision_config" else v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(match)):
        build_text_model(tmp_path, kind="vision")


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Phi3V, dtype="F32"),
               pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


def check_against_reference(pipe, ref, req, res, n=6):
    def prepare(pixels):
        return ref_features(ref, pixels) if pixels else None
    return vision_testing.check_against_reference(pipe, lambda ids, feats, spans: ref.logits(ids, feats, spans),
                                                  req, res, n, prepare=prepare)


def test_runner_batches_image_and_text_requests(runner, tiny):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, ids = tiny
    image_token = ids["<|image|>"]
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(image(50, 23, 1)), png_data_uri(image(20, 61, 2))
    reqs = [chat([{"type": "image_url", "image_url": {"url": url_a}}, {"type": "text", "text": "Describe it."}]),
            chat("Tell me a story about the Rust type system."),
            # tags written by the user, second image first
            chat([{"type": "image_url", "image_url": {"url": url_a}}, {"type": "image_url", "image_url": url_b},
                  {"type": "text", "text": "<|image_2|> and <|image_1|>: which is taller?"}])]
    steps = pipe.engine.stats["steps"]
    results = run_concurrently(runner, reqs)
    prompts = [check_against_reference(pipe, ref, q, r) for q, r in zip(reqs, results)]
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    proc = Phi3VImageProcessor.from_config(PREPROCESSOR)
    assert [s.length for s in prompts[2].spans] == [proc.num_tokens(20, 61), proc.num_tokens(50, 23)]
    assert prompts[0].spans[0].content_hash == prompts[2].spans[1].content_hash
    for p in prompts:
        assert p.ids.count(image_token) == sum(s.length for s in p.spans)
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_message_text_numbers_images_across_messages(runner):
    pipe = runner._pipeline(None)
    proc = pipe.processor
    parts = [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert proc.message_text(parts, {"image": 0}) == "<|image_1|><|image_2|>a b"
    assert proc.message_text(parts, {"image": 2}) == "<|image_3|><|image_4|>a b"
    assert proc.message_text([{"type": "text", "text": "x <|image_1|>"}, {"type": "image"}], {}) == "x <|image_1|>"
    assert proc.message_text([{"type": "text", "text": "plain"}], {"image": 3}) == "plain"
    url = png_data_uri(image(40, 40, 9))
    req = chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "one"}])
    req.messages.append({"role": "assistant", "content": "ok"})
    req.messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": "two"}]})
    prompt = pipe.chat_prompt(req)
    assert len(prompt.spans) == 2 and prompt.spans[0].content_hash == prompt.spans[1].content_hash


def test_runner_greedy_32_tokens(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    req = chat([{"type": "image_url", "image_url": {"url": png_data_uri(image(120, 31, 4))}},
                {"type": "text", "text": "What is in the picture?"}], n=32)
    check_against_reference(pipe, ref, req, runner.send_chat_completion_request(req), n=32)


def test_runner_chunked_prefill_splits_an_image_span(runner, tiny):
    """Image spans are causal: chunks may end inside one, each splicing its rows."""
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 100
    try:
        req = chat([{"type": "text", "text": "Look: <|image_1|> what is it?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(image(37, 29, 7))}}])
        steps = pipe.engine.stats["steps"]
        prompt = check_against_reference(pipe, ref, req, runner.send_chat_completion_request(req))
        assert prompt.spans[0].start % 100 != 0 and prompt.spans[0].length > 300
        assert pipe.engine.stats["steps"] - steps >= len(prompt.ids) // 100
    finally:
        sched.max_batch_tokens = old


def test_bad_inputs_fail_alone_while_an_image_request_completes(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    good = chat([{"type": "image_url", "image_url": {"url": png_data_uri(image(60, 60, 5))}},
                 {"type": "text", "text": "Describe it in many words."}], n=16)
    box = {}
    worker = threading.Thread(target=lambda: box.update(res=runner.send_chat_completion_request(good)))
    worker.start()
    url = png_data_uri(image(30, 30, 6))
    img = {"type": "image_url", "image_url": {"url": url}}
    bad = [(r"image tags \['<\|image_2\|>'\] do not number its 1 image", [img, {"type": "text", "text": "<|image_2|>"}]),
           (r"image tags \['<\|image_1\|>'\] do not number its 2 image", [img, img, {"type": "text", "text": "<|image_1|>"}]),
           ("too elongated", [{"type": "image_url", "image_url": {"url": png_data_uri(image(3000, 2))}}]),
           (r"^messages\[0\]\.content\[0\]\.image_url", [{"type": "image_url", "image_url": {"url": "data:,x"}}]),
           # no audio encoder: refused (by the pipeline or by the processor)
           ("audio", [{"type": "audio_url", "audio_url": {"url": "data:,x"}}, {"type": "text", "text": "hm"}])]
    for match, parts in bad:
        with pytest.raises(ValueError, match=match):
            runner.send_chat_completion_request(chat(parts))
    worker.join(timeout=120)
    check_against_reference(pipe, ref, good, box["res"], n=16)


def test_processor_needs_the_image_token(tiny, loaded):
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    from mistralrs_core.testing.tiny import write_tiny_tokenizer
    from mistralrs_arch_vision.phi3v import Phi3VProcessor
    import tempfile
    from pathlib import Path
    model, _, _ = loaded
    with tempfile.TemporaryDirectory() as d:
        write_tiny_tokenizer(Path(d))
        with pytest.raises(ValueError, match=r"tokenizer: no '<\|image\|>' token"):
            Phi3VProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                           tokenizer=Tokenizer.from_dir(d))


def test_bfloat16_model_runs_close_to_float32(tiny, loaded):
    """Crops and separators follow the model's dtype (the hub casts to the projector's)."""
    out, _, _ = tiny
    model32, _, image_token = loaded
    model16, _ = build_text_model(out, kind="vision", dtype=torch.bfloat16)
    pixels = pixels_of([(50, 23)])
    spans = [FeatureSpan(start=0, length=0, content_hash=b"", data=p) for p in pixels]
    with torch.inference_mode():
        f16, f32 = model16.encode_features(spans)[0], model32.encode_features(spans)[0]
    assert f16.dtype == torch.bfloat16 and max_rel_err(f16.float(), f32) < 5e-2
    ids, spans = prompt_with_images(image_token, pixels, list(range(9)), model16)
    logits = OneSequence(model16, num_blocks=256).step(ids, spans)
    assert torch.isfinite(logits).all()


def test_hub_config_builds_clip_l_336_and_phi3():
    """Phi-3.5-vision-instruct's config.json (no tower config: the hub code fixes CLIP
    ViT-L/14-336) builds, on the meta device, the model the hub's does minus CLIP's unused
    last layer and post_layernorm: 4.13 B parameters."""
    from mistralrs_arch_vision.phi3v import Phi3VForCausalLM
    hf = {"architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v", "vocab_size": 32064, "hidden_size": 3072,
          "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
          "hidden_act": "silu", "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
          "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False,
          "rope_scaling": {"type": "su", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48},
          "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                         "use_hd_transform": True, "with_learnable_separator": True},
          "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                            "name": "clip_vision_model", "num_img_tokens": 144}}
    model = Phi3VForCausalLM.from_hf_config(hf, torch.bfloat16)
    tower = model.vision_tower
    assert (tower.cfg.hidden_size, tower.cfg.patch_size, tower.cfg.image_size, len(tower.encoder.layers)) == \
        (1024, 14, 336, 23)
    assert model.image_embed.img_projection[0].weight.shape == (3072, 4096)
    assert model.cfg.rope.rope_type == "longrope" and model.cfg.qkv_fused and model.cfg.mlp_fused
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 4.13
    # 16 crops of a square image: the hub's count for 1344 x 1344
    assert model.tokens_for(1344, 1344) == (16 + 1) * 144 + 1 + 5 * 12
