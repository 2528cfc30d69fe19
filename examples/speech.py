"""Text to speech with Dia: `Runner.generate_audio` -> PCM samples -> a WAV file.

Offline by default: it writes a tiny RANDOM Dia and DAC codec to a temporary directory, so
the "speech" is noise, but the whole path runs (byte encoder, guided decoding over 9
codebooks with the delay pattern, the DAC decoder). With the real models (downloads ~6 GB):

    python examples/speech.py --model nari-labs/Dia-1.6B-0626 --dac descript/dac_44khz

The same model is served by `mistralrs serve --config speech.json` at POST /v1/audio/speech
(OpenAI's request shape: `client.audio.speech.create(model=..., voice=..., input=...)`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import wave
from pathlib import Path

from mistralrs import Runner, SpeechLoaderType, Which


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="Dia directory or hub id (default: a tiny random local model)")
    ap.add_argument("--dac", help="DAC codec directory or hub id")
    ap.add_argument("--out", default="speech.wav")
    ap.add_argument("text", nargs="?", default="[S1] Dia turns a script into dialogue. [S2] With two voices!")
    args = ap.parse_args()
    if args.model is None:
        from mistralrs_arch_speech.tiny import write_random_dac, write_random_dia
        tmp = Path(tempfile.mkdtemp())
        args.model, args.dac = str(write_random_dia(tmp / "dia")), str(write_random_dac(tmp / "dac"))
        print("model: a tiny RANDOM Dia + DAC (the audio is noise)", file=sys.stderr)
    runner = Runner(which=Which.Speech(model_id=args.model, arch=SpeechLoaderType.Dia, dac_model_id=args.dac),
                    seed=0)
    t0 = time.perf_counter()
    out = runner.generate_audio(args.text)
    took = time.perf_counter() - t0
    import numpy as np
    pcm16 = (np.clip(np.asarray(out.pcm, dtype=np.float32), -1, 1) * 32767).round().astype("<i2")
    with wave.open(args.out, "wb") as w:
        w.setnchannels(out.channels)
        w.setsampwidth(2)
        w.setframerate(out.rate)
        w.writeframes(pcm16.tobytes())
    seconds = len(out.pcm) / out.rate / out.channels
    print(f"{seconds:.2f} s of audio at {out.rate} Hz in {took:.2f} s -> {args.out}")
    runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
