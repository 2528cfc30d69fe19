"""``FluxPipeline``: prompt -> CLIP pooled vector + T5 states -> seeded latent noise ->
flow-matching Euler steps of the transformer -> VAE decode -> PNG, as an
``ImageGenerationResponse``.

Seeding follows diffusers: the initial noise is drawn on the host from a ``torch.Generator``
seeded once at load (``Runner(seed=S)``) in the transformer's dtype, in the unpacked
[1, C, h, w] layout, then packed into 2x2 patches; the first image of a ``Runner(seed=S)``
equals ``diffusers.FluxPipeline(generator=torch.Generator().manual_seed(S))``'s. Later
images continue the same random stream. Requests run one at a time (a lock): each
generation already uses every core or the whole accelerator.
"""
from __future__ import annotations

import base64
import io
import os
import secrets
import sys
import threading
import time
import uuid
from pathlib import Path

import attrs
import torch
from tqdm import tqdm

from mistralrs_core.api.enums import ImageGenerationResponseFormat, parse_enum
from mistralrs_core.api.responses import ImageChoice, ImageGenerationResponse
from mistralrs_core.pipeline.base import ImageGeneration

from mistralrs_arch_diffusion.placement import Placement
from mistralrs_arch_diffusion.scheduler import FlowMatchConfig, euler_step, flow_match_schedule

#: largest side accepted (Flux was trained up to about 2 megapixels)
MAX_SIDE = 4096
#: T5's limit in the reference pipeline
MAX_T5_TOKENS = 512


@attrs.define
class FluxDefaults:
    """Per-variant defaults: schnell (timestep-distilled, no guidance input) takes 4 steps and
    256 T5 tokens; dev (guidance-distilled) 50 steps, guidance 3.5 and 512 tokens, as Black
    Forest Labs' reference sampler uses them."""
    num_inference_steps: int
    guidance_scale: float | None
    max_sequence_length: int

    @classmethod
    def for_transformer(cls, guidance_embeds: bool, t5_limit: int = 512) -> "FluxDefaults":
        """``t5_limit``: the T5 tokenizer's ``model_max_length`` from the folder."""
        if guidance_embeds:
            return cls(50, 3.5, min(512, t5_limit))
        return cls(4, None, min(256, t5_limit))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: each 2x2 patch becomes one token (C-major)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent grid of h x w cells."""
    b, _, ch = tokens.shape
    x = tokens.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def latent_image_ids(h2: int, w2: int) -> torch.Tensor:
    """(0, row, col) for each packed token, row-major: [h2 * w2, 3] float32."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3)


def _progress_enabled() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class FluxPipeline(ImageGeneration):
    def __init__(self, name: str, *, clip, clip_tokenizer, t5, t5_tokenizer, transformer, vae,
                 scheduler: FlowMatchConfig, placement: Placement, seed: int | None = None,
                 defaults: FluxDefaults | None = None):
        self.name = name
        self.clip, self.clip_tokenizer = clip, clip_tokenizer
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        self.transformer, self.vae = transformer, vae
        self.scheduler = scheduler
        self.placement = placement
        self.defaults = defaults or FluxDefaults.for_transformer(transformer.cfg.guidance_embeds,
                                                                 t5_tokenizer.max_length)
        self.generator = torch.Generator("cpu")
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        self._lock = threading.Lock()

    # --- validation ---------------------------------------------------------
    @property
    def pixel_multiple(self) -> int:
        """Sides must be whole 2x2 patches of latent cells."""
        return 2 * self.vae.cfg.scale_factor

    def check_size(self, height, width) -> None:
        m = self.pixel_multiple
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}: must be an integer number of pixels, got {v!r}")
            if v < m or v > MAX_SIDE:
                raise ValueError(f"{name}: must be between {m} and {MAX_SIDE} pixels, got {v}")
            if v % m:
                raise ValueError(f"{name}: must be a multiple of {m} (whole 2x2 patches of "
                                 f"{self.vae.cfg.scale_factor}-pixel latent cells), got {v}")

    @staticmethod
    def check_prompt(prompt) -> None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt: must not be empty")

    # --- stages ---------------------------------------------------------------
    def encode_prompt(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states [1, L, joint_dim], CLIP pooled [1, pooled_dim]) in the transformer's dtype."""
        dev, dtype = self.placement.compute, self.transformer.dtype
        clip_ids = torch.tensor([self.clip_tokenizer.encode(prompt)], device=dev)
        with self.placement.running(self.clip):
            _, pooled = self.clip(clip_ids)
        t5_ids = torch.tensor([self.t5_tokenizer.encode(prompt, max_sequence_length)], device=dev)
        with self.placement.running(self.t5):
            states = self.t5(t5_ids)
        return states.to(dtype), pooled.to(dtype)

    def initial_latents(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Packed noise [1, tokens, 4C]; drawn on the host in the transformer's dtype."""
        s = self.vae.cfg.scale_factor
        h, w = 2 * (height // (2 * s)), 2 * (width // (2 * s))
        c = self.transformer.cfg.in_channels // 4
        noise = torch.randn((1, c, h, w), generator=generator, device="cpu", dtype=self.transformer.dtype)
        return pack_latents(noise).to(self.placement.compute)

    @torch.inference_mode()
    def generate(self, prompt: str, height: int, width: int, *, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, max_sequence_length: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The image as float32 [1, 3, height, width] in [0, 1] (before 8-bit rounding)."""
        self.check_prompt(prompt)
        self.check_size(height, width)
        steps = num_inference_steps or self.defaults.num_inference_steps
        max_len = max_sequence_length or self.defaults.max_sequence_length
        if not 1 <= max_len <= MAX_T5_TOKENS:
            raise ValueError(f"max_sequence_length: must be between 1 and {MAX_T5_TOKENS}, got {max_len}")
        gs = guidance_scale if guidance_scale is not None else self.defaults.guidance_scale
        dev = self.placement.compute
        with self._lock:
            states, pooled = self.encode_prompt(prompt, max_len)
            latents = self.initial_latents(height, width, generator or self.generator)
            s = self.vae.cfg.scale_factor
            h, w = 2 * (height // (2 * s)), 2 * (width // (2 * s))
            img_ids = latent_image_ids(h // 2, w // 2).to(dev)
            txt_ids = torch.zeros(states.shape[1], 3, device=dev)
            schedule = flow_match_schedule(self.scheduler, steps, latents.shape[1])
            sigmas = schedule.sigmas.to(dev)
            guidance = None
            if self.transformer.cfg.guidance_embeds:
                guidance = torch.full([1], 3.5 if gs is None else gs, device=dev, dtype=torch.float32)
            with self.placement.running(self.transformer):
                rope = self.transformer.rope(txt_ids, img_ids).to(dev)
                for i in tqdm(range(steps), desc="Denoising", unit="step", file=sys.stderr,
                              disable=not _progress_enabled(), leave=False):
                    # The reference hands timesteps through the latents' dtype, then /1000.
                    t = schedule.timesteps[i].to(dev).expand(1).to(latents.dtype) / 1000
                    velocity = self.transformer(latents, states, pooled, t, guidance=guidance, rope=rope)
                    latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
            z = unpack_latents(latents, h, w)
            with self.placement.running(self.vae):
                image = self.vae.decode(z)
            return (image.float() / 2 + 0.5).clamp(0, 1).cpu()

    # --- the SDK call -----------------------------------------------------------
    def generate_image(self, prompt: str, response_format, height: int, width: int,
                       save_file: str | None = None) -> ImageGenerationResponse:
        fmt = parse_enum(ImageGenerationResponseFormat, response_format, "response_format")
        image = self.generate(prompt, height, width)
        png = to_png(image[0])
        choice = ImageChoice()
        if fmt is ImageGenerationResponseFormat.Url or save_file:
            path = Path(save_file) if save_file else Path(os.getcwd()) / f"image-{uuid.uuid4().hex}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
            if fmt is ImageGenerationResponseFormat.Url:
                choice.url = str(path.resolve())
        if fmt is ImageGenerationResponseFormat.B64Json:
            choice.b64_json = base64.b64encode(png).decode("ascii")
        return ImageGenerationResponse(data=[choice], created=int(time.time()))

    def shutdown(self) -> None:
        for name in ("clip", "t5", "transformer", "vae"):
            setattr(self, name, None)


def to_png(image: torch.Tensor) -> bytes:
    """[3, H, W] in [0, 1] -> PNG bytes (rounded to 8 bits as diffusers' PIL output is)."""
    from PIL import Image

    arr = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
