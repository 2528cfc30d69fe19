"""Flux image generation: seconds per denoising step and peak RSS above the runtime floor,
ours against diffusers' ``FluxPipeline`` on the same random weights, in one run.

The model keeps Flux's block structure (double-stream then single-stream blocks, 3-axis rope,
T5 + CLIP text encoders, the 16-channel VAE with 4 resolution levels) at a width and depth
this 2-core machine can run: see ``SHAPE``. Both engines load the same diffusers folder in the
same dtype (bf16 when the CPU has AMX/AVX512-BF16, else float32; ``--dtype`` forces one) with
the same thread count, each in its own process, so peak RSS is each engine's own:
``VmHWM - VmRSS`` after imports (the "runtime floor": Python, torch and the engine's modules).
A step is one transformer call (the scheduler update is a few element-wise ops); the first
step is a warm-up and not counted; the fastest of the rest is reported (other processes on a
shared machine only add time), with the median and the median process CPU time. The engines alternate for ``--rounds`` rounds and each keeps its best round. Prints a
table and writes bench/results/diffusion-<date>.json.

    .venv/bin/python bench/diffusion.py [--threads 2] [--steps 6] [--size 512] [--dtype auto|bf16|f32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(heads=12, head_dim=64, rope=(8, 28, 28), double=4, single=8,
             t5=dict(d_model=768, d_ff=2048, num_layers=4, num_heads=12, d_kv=64),
             clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12),
             vae=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32))
PROMPT = "a red fox in the snow"


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def write_model(out: Path, dtype_name: str) -> None:
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "arch_diffusion" / "tests"))
    import tiny_flux
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip_tok, t5_tok = tiny_flux.clip_tokenizer(), tiny_flux.t5_tokenizer()
    t5_tok.model_max_length = 256
    s = SHAPE
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), max_position_embeddings=77,
                                        eos_token_id=clip_tok.eos_token_id, **s["clip"]))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok) + 3, feed_forward_proj="gated-gelu", **s["t5"]))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=s["double"], num_single_layers=s["single"],
        attention_head_dim=s["head_dim"], num_attention_heads=s["heads"], joint_attention_dim=s["t5"]["d_model"],
        pooled_projection_dim=s["clip"]["hidden_size"], guidance_embeds=False, axes_dims_rope=s["rope"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611, **s["vae"])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    for i, m in enumerate((clip, t5, transformer, vae)):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.0).add_(torch.randn(p.shape, generator=g) * 0.02)
        m.to(dtype)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    tiny_flux.save(pipe, out)


def _timed(module, times: list, cpu_times: list):
    inner = module.forward

    def forward(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        out = inner(*a, **k)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        return out

    module.forward = forward


def run_engine(engine: str, model_dir: str, dtype_name: str, threads: int, steps: int, size: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    if engine == "ours":
        from mistralrs import DiffusionArchitecture, ModelDType, Runner, Which  # noqa: F401
        from mistralrs_arch_diffusion.loader import load_flux  # noqa: F401
    else:
        from diffusers import FluxPipeline  # noqa: F401
    floor = _status("VmRSS")
    times: list[float] = []
    cpu_times: list[float] = []
    t0 = time.perf_counter()
    if engine == "ours":
        runner = Runner(which=Which.DiffusionPlain(model_id=model_dir, arch=DiffusionArchitecture.Flux,
                                                   dtype=ModelDType.BF16 if dtype_name == "bf16" else ModelDType.F32),
                        seed=0)
        pipe = runner._pipeline(None)
        load_s = time.perf_counter() - t0
        mem = _mem(floor)
        _timed(pipe.transformer, times, cpu_times)
        t1 = time.perf_counter()
        img = pipe.generate(PROMPT, size, size, num_inference_steps=steps, max_sequence_length=256,
                            generator=torch.Generator().manual_seed(0))
        total = time.perf_counter() - t1
        arr = img[0].permute(1, 2, 0).numpy()
    else:
        pipe = FluxPipeline.from_pretrained(model_dir, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0
        mem = _mem(floor)
        _timed(pipe.transformer, times, cpu_times)
        t1 = time.perf_counter()
        with torch.inference_mode():
            arr = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                       max_sequence_length=256, generator=torch.Generator().manual_seed(0),
                       output_type="np").images[0]
        total = time.perf_counter() - t1
    counted = times[1:] if len(times) > 1 else times
    counted_cpu = cpu_times[1:] if len(cpu_times) > 1 else cpu_times
    import numpy as np
    np.save(os.environ["BENCH_IMAGE_OUT"], arr)
    return dict(engine=engine, dtype=dtype_name, threads=threads, steps=steps, size=size, load_s=load_s,
                # On a shared machine other processes only ever add time: the fastest step is
                # the estimate least disturbed by them (the median is kept too).
                step_s=min(counted), step_median_s=sorted(counted)[len(counted) // 2],
                step_cpu_s=sorted(counted_cpu)[len(counted_cpu) // 2], step_times=times, step_cpu_times=cpu_times,
                generate_s=total,
                floor_mib=floor / 2**20, peak_above_floor_mib=(_status("VmHWM") - floor) / 2**20,
                after_load=mem, after_generate=_mem(floor))


def _mem(floor: int) -> dict:
    """MiB: RSS above the floor, peak so far above the floor, anonymous and file-backed RSS."""
    return {k: round(v / 2**20) for k, v in (("rss", _status("VmRSS") - floor), ("peak", _status("VmHWM") - floor),
                                              ("anon", _status("RssAnon")), ("file", _status("RssFile")))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "f32"))
    ap.add_argument("--rounds", type=int, default=2, help="alternate the engines this many times")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.model_dir, args.dtype, args.threads, args.steps, args.size)))
        return
    from mistralrs_core.loading.options import cpu_has_fast_bf16
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if cpu_has_fast_bf16() else "f32")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "flux"
        write_model(model_dir, dtype)
        rows: dict = {}
        images = {}
        # Alternating rounds (diffusers, ours, diffusers, ...): load on a shared machine drifts,
        # and each engine keeps its best round.
        for rnd in range(args.rounds):
            for engine in ("diffusers", "ours"):
                out_img = Path(tmp) / f"{engine}.npy"
                env = {**os.environ, "BENCH_IMAGE_OUT": str(out_img)}
                proc = subprocess.run([sys.executable, __file__, "--engine", engine, "--model-dir", str(model_dir),
                                       "--dtype", dtype, "--threads", str(args.threads), "--steps",
                                       str(args.steps), "--size", str(args.size)], capture_output=True, text=True,
                                      env=env)
                if proc.returncode:
                    sys.exit(f"{engine} failed:\n{proc.stderr[-4000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["round"] = rnd
                best = rows.get(engine)
                rows.setdefault(engine + "_rounds", []).append(row)
                if best is None or row["step_s"] < best["step_s"]:
                    rows[engine] = row
                import numpy as np
                images[engine] = np.load(out_img)
    import numpy as np
    o, d = rows["ours"], rows["diffusers"]
    # Over all rounds: the fastest step, the median step and the median CPU time per step.
    for e, r in (("ours", o), ("diffusers", d)):
        walls = [t for x in rows[e + "_rounds"] for t in x["step_times"][1:]]
        cpus = [t for x in rows[e + "_rounds"] for t in x["step_cpu_times"][1:]]
        r["step_s"], r["step_median_s"] = min(walls), sorted(walls)[len(walls) // 2]
        r["step_cpu_s"] = sorted(cpus)[len(cpus) // 2]
    speed = d["step_s"] / o["step_s"]
    speed_median = d["step_median_s"] / o["step_median_s"]
    speed_cpu = d["step_cpu_s"] / o["step_cpu_s"]
    # Peak memory does not depend on load: the largest over the rounds on each side.
    peak = {e: max(r["peak_above_floor_mib"] for r in rows[e + "_rounds"]) for e in ("ours", "diffusers")}
    o["peak_above_floor_mib"], d["peak_above_floor_mib"] = peak["ours"], peak["diffusers"]
    mem = o["peak_above_floor_mib"] / d["peak_above_floor_mib"]
    diff = float(np.abs(images["ours"] - images["diffusers"]).max())
    print(f"Flux-shaped {SHAPE['double']}+{SHAPE['single']} blocks, {SHAPE['heads']}x{SHAPE['head_dim']} heads, "
          f"{args.size}x{args.size}, {args.steps} steps, {dtype} on both sides, {args.threads} threads")
    print(f"{'engine':<10} {'s/step min':>10} {'median':>7} {'cpu s':>6} {'generate s':>11} {'load s':>7} "
          f"{'peak-floor MiB':>15} {'floor MiB':>10}")
    for r in (d, o):
        print(f"{r['engine']:<10} {r['step_s']:>10.3f} {r['step_median_s']:>7.3f} {r['step_cpu_s']:>6.2f} "
              f"{r['generate_s']:>11.2f} {r['load_s']:>7.2f} {r['peak_above_floor_mib']:>15.0f} {r['floor_mib']:>10.0f}")
    print(f"speed-up per step: {speed:.2f}x fastest step, {speed_median:.2f}x median, {speed_cpu:.2f}x CPU time "
          f"(goal >= 1.3x); peak memory ratio: {mem:.2f} (goal <= 0.8); "
          f"max abs pixel difference between the two images: {diff:.4f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"diffusion-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(dict(shape=SHAPE, rows=rows, speedup=speed, speedup_median=speed_median,
                                   speedup_cpu=speed_cpu, memory_ratio=mem, pixel_diff=diff),
                              indent=1, default=list))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
