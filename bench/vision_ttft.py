"""Vision: time to first token for one image, and images/s with 8 concurrent image requests,
ours against transformers on the same random weights, in one run.

The model is LLaVA 1.5's shape where it costs: a CLIP ViT-L/14 tower at 336 px (24 layers,
577 tokens an image) and its projector, with a small Llama text side (the text side is not
what this measures). transformers runs `generate` with the same inputs; both use float32
and the same thread count. Prints a table and writes bench/results/vision-<date>.json.

    .venv/bin/python bench/vision_ttft.py [--threads 2] [--concurrent 8] [--tokens 8]
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
TEMPLATE = ("{% for message in messages %}{{ message['role'] + ': ' }}{% if message['content'] is string %}"
            "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
            "{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def write_model(out: Path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from tokenizers import AddedToken, Tokenizer
    from mistralrs_core.testing.parity import perturb_parameters
    from mistralrs_core.testing.tiny import write_tiny_tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.save(str(out / "tokenizer.json"))
    image_token = tok.token_to_id("<image>")
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768)
    tc = LlamaConfig(vocab_size=image_token + 1, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                     eos_token_id=None, bos_token_id=None)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=576)
    torch.manual_seed(0)
    ref = LlavaForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=1, scale=0.02)
    ref.save_pretrained(out, safe_serialization=True)
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 336},
           "resample": 3, "do_center_crop": True, "crop_size": {"height": 336, "width": 336}, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return ref


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(n)]


def data_uri(img: Image.Image) -> str:
    import base64
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ours(model_dir: Path, imgs, tokens: int, concurrent: int, dtype: str = "F32") -> dict:
    from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which
    runner = Runner(which=Which.VisionPlain(model_id=str(model_dir), arch=VisionArchitecture.LLaVa, dtype=dtype),
                    prefix_cache_n=0, max_seqs=concurrent)

    def req(img):
        return ChatCompletionRequest(model="default", max_tokens=tokens, temperature=0.0, ignore_eos=True,
                                     messages=[{"role": "user", "content": [
                                         {"type": "image_url", "image_url": {"url": data_uri(img)}},
                                         {"type": "text", "text": "Describe the image."}]}])
    runner.send_chat_completion_request(req(imgs[-1]))                       # warm-up
    first = runner.send_chat_completion_request(req(imgs[0])).usage.total_prompt_time_sec
    reqs = [req(img) for img in imgs[:concurrent]]
    t = time.perf_counter()
    threads = [threading.Thread(target=runner.send_chat_completion_request, args=(r,)) for r in reqs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    runner.shutdown()
    return {"ttft_s": first, "images_per_s": concurrent / wall}


def reference(ref, model_dir: Path, imgs, tokens: int, concurrent: int, dtype=torch.float32) -> dict:
    ref = ref.to(dtype)
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    proc = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(model_dir), tokenizer=tok,
                          patch_size=14, vision_feature_select_strategy="default", chat_template=TEMPLATE,
                          num_additional_image_tokens=1,
                          image_token="<image>")

    def inputs(batch):
        msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
                for _ in batch]
        texts = [proc.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
        tok.pad_token = tok.pad_token or "<|endoftext|>"
        out = proc(text=texts, images=list(batch), return_tensors="pt", padding=True)
        out["pixel_values"] = out["pixel_values"].to(dtype)
        return out

    with torch.inference_mode():
        ref.generate(**inputs(imgs[-1:]), max_new_tokens=1, do_sample=False)    # warm-up
        x = inputs(imgs[:1])
        t = time.perf_counter()
        ref.generate(**x, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t
        x = inputs(imgs[:concurrent])
        t = time.perf_counter()
        ref.generate(**x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        wall = time.perf_counter() - t
    return {"ttft_s": ttft, "images_per_s": concurrent / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--dtype", default="F32",
                    help="our model dtype: F32 (as transformers here) or Auto (bf16 where the CPU has "
                         "AMX/AVX512-BF16, our default; transformers stays float32, its CPU default)")
    ap.add_argument("--reference-dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(tempfile.mkdtemp(prefix="vision-bench-"))
    ref = write_model(model_dir)
    imgs = images(args.concurrent + 1)
    a = ours(model_dir, imgs, args.tokens, args.concurrent, args.dtype)
    b = reference(ref, model_dir, imgs, args.tokens, args.concurrent, getattr(torch, args.reference_dtype))
    rows = [("time to first token, 1 image (s)", a["ttft_s"], b["ttft_s"], b["ttft_s"] / a["ttft_s"]),
            (f"images/s, {args.concurrent} concurrent requests, {args.tokens} tokens each",
             a["images_per_s"], b["images_per_s"], a["images_per_s"] / b["images_per_s"])]
    print(f"CLIP ViT-L/14-336 tower + 4-layer Llama; ours dtype {args.dtype}, transformers {args.reference_dtype}; "
          f"{args.threads} threads\n")
    print("| measure | ours | transformers | speed-up |\n|---|---|---|---|")
    for name, x, y, r in rows:
        print(f"| {name} | {x:.3g} | {y:.3g} | {r:.2f}x |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"vision-{datetime.now():%Y-%m-%d-%H%M%S}.json"
    out.write_text(json.dumps({"args": vars(args), "ours": a, "transformers": b}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
