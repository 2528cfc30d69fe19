"""Speech: seconds of audio generated per second of wall time, ours (Runner.generate_audio,
requests sent concurrently) against transformers' Dia `generate` + `DacModel.decode` on the
same random weights, in one run.

The model keeps Dia's block structure (byte encoder, GQA decoder with cross-attention,
9 codebooks of 1028 ids with the real delay pattern, classifier-free guidance, the DAC
decoder with its 44.1 kHz strides [8, 8, 4, 2] = 512 samples a frame), scaled down to fit
a 2-core machine. Random weights rarely say EOS, so both engines stop at the same maximum
length: every request yields the same number of frames. transformers gets all requests in
one batched `generate` call (its best case); its processor-side delay revert and DAC decode
run after it, as `DiaProcessor.batch_decode` does.

    .venv/bin/python bench/speech.py [--threads 2] [--requests 4] [--frames 120] [--also-dtype auto]
        [--rounds 3] [--repeats 3]

Both wall time and process CPU time are reported: on a shared machine the wall clock
mostly measures the other processes. ``--repeats`` times each engine several times within a
round, alternating, and keeps each one's least CPU time; ``--rounds`` repeats the whole
comparison and reports every round and the median ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

if __name__ == "__main__":
    # Every thread's OpenMP team (the main thread's, our engine thread's, the worker thread
    # transformers runs in) gets the same width: set before torch loads.
    _t = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
    if _t is None and "--threads" in sys.argv:
        _t = sys.argv[sys.argv.index("--threads") + 1]
    os.environ["OMP_NUM_THREADS"] = _t or "2"

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DELAY = [0, 8, 9, 10, 11, 12, 13, 14, 15]
PROMPTS = ["[S1] Dia is an open weights text to dialogue model. [S2] You get full control over scripts and voices.",
           "[S1] Wow. Amazing. (laughs) [S2] Try it now on GitHub or Hugging Face.",
           "[S1] The quick brown fox jumps over the lazy dog, again and again.",
           "[S2] Speech generation on a small machine, four requests at once."]


def write_models(root: Path, frames: int):
    from transformers import DacConfig, DacModel, DiaConfig, DiaDecoderConfig, DiaEncoderConfig
    from transformers import DiaForConditionalGeneration
    from mistralrs_core.testing.parity import perturb_parameters
    enc = DiaEncoderConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=64, vocab_size=256, max_position_embeddings=1024)
    dec = DiaDecoderConfig(num_hidden_layers=6, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=64, cross_num_attention_heads=8, cross_head_dim=64,
                           cross_num_key_value_heads=8, cross_hidden_size=256, vocab_size=1028, num_channels=9,
                           max_position_embeddings=3072)
    torch.manual_seed(0)
    dia = DiaForConditionalGeneration(DiaConfig(encoder_config=enc, decoder_config=dec, delay_pattern=DELAY)).eval()
    perturb_parameters(dia, seed=1, scale=0.02)
    dia.save_pretrained(root / "dia", safe_serialization=True)
    gen = {"do_sample": True, "guidance_scale": 3.0, "temperature": 1.3, "top_p": 0.95, "top_k": 35,
           "max_length": frames}
    (root / "dia" / "generation_config.json").write_text(json.dumps(gen))
    dac = DacModel(DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4, 8, 8], decoder_hidden_size=256,
                             n_codebooks=9, codebook_size=1024, codebook_dim=8, sampling_rate=44100)).eval()
    perturb_parameters(dac, seed=2, scale=0.02)
    dac.save_pretrained(root / "dac", safe_serialization=True)
    return dia, dac, gen


def open_ours(root: Path, n: int, dtype: str = "f32"):
    from mistralrs import Runner, SpeechLoaderType, Which
    runner = Runner(which=Which.Speech(model_id=str(root / "dia"), arch=SpeechLoaderType.Dia,
                                       dac_model_id=str(root / "dac"), dtype=dtype), seed=0, max_seqs=n)
    runner.generate_audio("[S1] warm up")
    return runner


def run_ours(runner, n: int) -> tuple[float, float, float]:
    out = [None] * n

    def work(i):
        out[i] = runner.generate_audio(PROMPTS[i % len(PROMPTS)])

    t0, c0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    audio = sum(len(o.pcm) / o.rate for o in out)
    return audio, wall, cpu


def run_transformers(dia, dac, gen: dict, n: int, warm_up: bool = True) -> tuple[float, float, float]:
    from transformers.models.dia.processing_dia import DiaProcessor
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    def encode(batch):
        ids = [list(p.replace("[S1]", "\x01").replace("[S2]", "\x02").encode()) for p in batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        t = torch.arange(1 + max(DELAY))[:, None]
        dec = torch.where(t <= torch.tensor(DELAY)[None, :], 1026, 1025)[None].repeat(len(batch), 1, 1)
        return input_ids, mask, dec, torch.ones(len(batch), 1 + max(DELAY), dtype=torch.long)

    def generate(batch):
        input_ids, mask, dec_ids, dec_mask = encode(batch)
        with torch.no_grad():
            seq = dia.generate(input_ids=input_ids, attention_mask=mask, decoder_input_ids=dec_ids,
                               decoder_attention_mask=dec_mask, do_sample=True, disable_compile=True, guidance_scale=gen["guidance_scale"],
                               temperature=gen["temperature"], top_p=gen["top_p"], top_k=gen["top_k"],
                               max_length=gen["max_length"])
            b, t, c = seq.shape
            start = (seq[:, :, 0] == 1026).sum(-1)
            end = t - (seq[:, :, 0] == 1025).sum(-1) - 1
            idx = DiaProcessor.build_indices(bsz=b, seq_len=t, num_channels=c, delay_pattern=DELAY, revert=True)
            codes = DiaProcessor.apply_audio_delay(seq, -1, -1, idx).transpose(1, 2)
            return [dac.decode(audio_codes=codes[i:i + 1, :, start[i]:end[i]]).audio_values[0] for i in range(b)]

    def in_thread(batch):
        # Like our engine, run in a fresh thread: a thread's OpenMP team lives as long as it,
        # and on a busy machine the main thread's long-lived team was 10x slower here.
        box = {}
        t = threading.Thread(target=lambda: box.update(out=generate(batch)))
        t.start()
        t.join()
        return box["out"]

    if warm_up:
        in_thread(["[S1] warm up"])
    t0, c0 = time.perf_counter(), time.process_time()
    waves = in_thread(prompts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return sum(w.shape[-1] / 44100 for w in waves), wall, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--frames", type=int, default=120, help="frames per request (86 frames = 1 s of audio)")
    ap.add_argument("--also-dtype", nargs="*", default=["auto"],
                    help="our extra dtypes to run besides f32 (auto: bf16 where the CPU has fast bf16)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the interleaved comparison; report the median")
    ap.add_argument("--repeats", type=int, default=1,
                    help="within a round, time each engine this many times, alternating, and keep each one's "
                         "fastest (least CPU time): a busy machine only ever adds time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dia, dac, gen = write_models(root, args.frames)
        rounds = []
        for rnd in range(args.rounds):
            rows = {}
            for n in sorted({1, args.requests}):
                dtypes = ("f32", *args.also_dtype)
                runners = {d: open_ours(root, n, d) for d in dtypes}
                try:
                    ref_runs, our_runs = [], {d: [] for d in dtypes}
                    for rep in range(args.repeats):
                        ref_runs.append(run_transformers(dia, dac, gen, n, warm_up=rep == 0))
                        for d in dtypes:
                            our_runs[d].append(run_ours(runners[d], n))
                finally:
                    for r in runners.values():
                        r.shutdown()
                ra, rw, rc = min(ref_runs, key=lambda x: x[2])
                for dtype in dtypes:
                    a, w, c = min(our_runs[dtype], key=lambda x: x[2])
                    rows[f"{n} req, ours {dtype}"] = {
                        "ours_audio_s": a, "ours_wall_s": w, "ours_cpu_s": c, "ref_audio_s": ra, "ref_wall_s": rw,
                        "ref_cpu_s": rc, "ours_rtf": a / w, "ref_rtf": ra / rw,
                        "speedup_wall": (a / w) / (ra / rw), "speedup_cpu": (a / c) / (ra / rc)}
            rounds.append(rows)
            print(f"round {rnd + 1}: " + ", ".join(f"{k} {r['speedup_cpu']:.2f}x cpu ({r['speedup_wall']:.2f}x wall)"
                                                  for k, r in rows.items()), flush=True)
    median = {k: {m: statistics.median(r[k][m] for r in rounds) for m in rounds[0][k]} for k in rounds[0]}
    print(f"median of {len(rounds)} round(s):")
    print(f"{'run':>18} | {'ours audio s/s':>14} | {'transformers f32 audio s/s':>26} | speed-up (wall) | (cpu time)")
    for name, r in median.items():
        print(f"{name:>18} | {r['ours_rtf']:>14.3f} | {r['ref_rtf']:>26.3f} | {r['speedup_wall']:>14.2f}x |"
              f" {r['speedup_cpu']:.2f}x")
    rows = median
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"speech-{datetime.now():%Y%m%d-%H%M}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "rounds": rounds}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
