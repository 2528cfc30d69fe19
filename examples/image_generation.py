"""Generate an image with Flux: ``python examples/image_generation.py [MODEL_DIR] [OUT.png]``.

MODEL_DIR is a Flux folder (diffusers layout, or Black Forest Labs' ``flux1-*.safetensors`` +
``ae.safetensors`` beside the config folders) or a hub id already in the local cache. Without
one, a tiny random Flux is written to a temporary folder (offline; its image is noise-like,
but every stage runs: CLIP + T5 prompt encoding, 4 schnell steps, VAE decode, PNG).
"""
from __future__ import annotations

import base64
import sys
import tempfile

from mistralrs import DiffusionArchitecture, ImageGenerationResponseFormat, Runner, Which


def main() -> int:
    tmp = None
    if len(sys.argv) > 1:
        model_dir = sys.argv[1]
    else:
        from mistralrs_arch_diffusion.tiny import write_tiny_flux
        tmp = tempfile.TemporaryDirectory()
        model_dir = str(write_tiny_flux(tmp.name))
    out = sys.argv[2] if len(sys.argv) > 2 else "fox.png"
    # FluxOffloaded keeps the big components off the GPU until each one runs.
    runner = Runner(which=Which.DiffusionPlain(model_id=model_dir, arch=DiffusionArchitecture.Flux), seed=0)
    res = runner.generate_image("a red fox in the snow", ImageGenerationResponseFormat.Url,
                                height=256, width=256, save_file=out)
    print("wrote", res.data[0].url)
    b64 = runner.generate_image("a blue sky over green hills", ImageGenerationResponseFormat.B64Json,
                                height=128, width=192)
    print("second image:", len(base64.b64decode(b64.data[0].b64_json or "")), "PNG bytes")
    runner.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
