"""Idefics3 (and SmolVLM's Idefics3 checkpoints): a SigLIP-like tower with fractional
positions, a pixel-shuffle connector and a Llama text decoder.

An image is cut into tiles plus a global (whole, downscaled) image; the prompt writes each
tile as ``<fake_token_around_image><row_r_col_c>`` + ``image_seq_len`` ``<image>`` tokens
(rows end in a newline), then ``\\n<fake_token_around_image><global-img>`` + the global
image's tokens + ``<fake_token_around_image>``; an image small enough for one tile is only
the global part. Text sits between the tiles' token runs, so the processor expands the
rendered text (``expand_prompt``) and gives every run its own causal ``FeatureSpan``.

Checkpoint names (transformers 4 and 5 alike): ``model.text_model.*``, ``lm_head.*``,
``model.vision_model.*``, ``model.connector.*``.
"""
from __future__ import annotations


import attrs
import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config
from mistralrs_core.pipeline.text import Prompt
from mistralrs_core.tokenization.prompt import encode_prompt

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import part_digest, token_runs
from mistralrs_arch_vision.processors.idefics3 import Idefics3ImageProcessor
from mistralrs_arch_vision.towers.idefics3 import Idefics3Connector, Idefics3VisionTower, idefics3_tower_config

# transformers' LlamaConfig defaults with the rms_norm_eps Idefics3Config gives its text model.
LLAMA_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048,
                           rms_norm_eps=1e-5, rope_theta=10000.0)
_IMAGE_TOKEN_ID = 128_257            # Idefics3Config's default
FAKE_TOKEN, GLOBAL_TAG = "<fake_token_around_image>", "<global-img>"


def text_config_of(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    if text.get("model_type") not in ("llama", None):
        raise ValueError(f"text_config.model_type: Idefics3 with a {text['model_type']!r} text model is not "
                         f"supported (Llama text only)")
    # The head belongs to the composite, so its flag (default untied) decides, as in
    # transformers 5; the text model's own flag describes a head it does not have.
    return {**LLAMA_TEXT_DEFAULTS, **text, "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False))}


_PREFIXES = (  # checkpoint prefix -> module-tree prefix (first match wins)
    ("model.text_model.", "model."),
    ("model.vision_model.", "vision_tower."),
    ("model.connector.", "connector."),
)


class Idefics3ForConditionalGeneration(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "Idefics3ForConditionalGeneration":
        text = text_config_of(hf)
        model = cls(cls.config_from_hf(text), dtype)
        vision = idefics3_tower_config(hf.get("vision_config") or {})
        scale = int(hf.get("scale_factor", 2))
        if vision.patches_per_side % scale:
            raise ValueError(f"scale_factor {scale} does not divide the {vision.patches_per_side}-patch grid")
        model.vision_tower = Idefics3VisionTower(vision, dtype=dtype)
        model.connector = Idefics3Connector(vision.hidden_size, model.cfg.hidden_size, scale)
        model.image_token_id = int(hf.get("image_token_id", _IMAGE_TOKEN_ID))
        # Tokens per vision_config.image_size tile (transformers' image_seq_len).
        model.tokens_per_image = vision.num_patches // (scale * scale)
        return model

    @classmethod
    def config_from_hf(cls, text: dict):
        bias = bool(text.get("attention_bias", False))
        return base_config(text, qkv_bias=bias, o_bias=bias, mlp_bias=bool(text.get("mlp_bias", False)))

    def map_weight_name(self, name):
        name = self.rename_checkpoint(name)
        if name.startswith("vision_tower."):
            inner = self.vision_tower.map_weight_name(name[len("vision_tower."):])
            return None if inner is None else "vision_tower." + inner
        return super().map_weight_name(name)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] same-size tiles -> [B, (H/patch/scale) * (W/patch/scale), text hidden]."""
        patches = self.vision_tower(pixels.to(device=self.lm_device, dtype=self.dtype))
        return self.connector(patches)

    def encode_features(self, spans):
        # Tiles of one size share a tower call (with one checkpoint's processor, all do).
        out: list = [None] * len(spans)
        by_shape: dict[tuple, list[int]] = {}
        for i, s in enumerate(spans):
            by_shape.setdefault(tuple(s.data.shape), []).append(i)
        for idx in by_shape.values():
            for i, f in zip(idx, self.image_features(torch.stack([spans[i].data for i in idx]))):
                out[i] = f
        return out


# --------------------------------------------------------------------------- the processor
@attrs.define
class Idefics3Processor:
    """The family's half of the pipeline. The chat template writes ``<image>`` per image
    part; ``expand_prompt`` replaces each, in the rendered text, by what transformers'
    ``Idefics3Processor`` writes for the image's tiles, tokenizes, and gives every tile's run
    of image tokens a ``FeatureSpan`` (row-major tiles, then the global image)."""
    image_processor: Idefics3ImageProcessor
    tokenizer: object
    image_token_id: int
    image_token: str
    tokens_per_tile: int
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "Idefics3Processor":
        if tokenizer is None:
            raise ValueError("Idefics3's processor needs the tokenizer (its image tokens are text)")
        proc = Idefics3ImageProcessor.from_hf(preprocessor_config)
        if proc.tile != model.vision_tower.cfg.image_size:
            # Other tile sizes would run (fractional positions) but change the token count
            # per tile, which transformers' processor does not follow (image_seq_len is fixed).
            raise ValueError(f"preprocessor_config.json: max_image_size {proc.tile} does not match the vision "
                             f"tower's image_size {model.vision_tower.cfg.image_size}")
        name = tokenizer.id_to_token(model.image_token_id)
        if name is None:
            raise ValueError(f"config.json: image token id {model.image_token_id} is not in the tokenizer")
        return cls(proc, tokenizer, model.image_token_id, name, model.tokens_per_image)

    def image_text(self, rows: int, cols: int) -> str:
        """What one image's placeholder becomes (transformers' layout)."""
        run = self.image_token * self.tokens_per_tile
        glob = f"{FAKE_TOKEN}{GLOBAL_TAG}{run}{FAKE_TOKEN}"
        if not rows:
            return glob
        grid = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return f"{grid}\n{glob}"

    def expand_prompt(self, text: str, images, audios=()) -> Prompt:
        """Rendered chat text + loaded images -> token ids with one span per tile."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"messages: the rendered prompt holds {len(pieces) - 1} image placeholder(s) for "
                             f"{len(images)} image(s); the chat template must emit one per image part")
        tiled = [self.image_processor(img.image) for img in images]
        out = [pieces[0]]
        for t, rest in zip(tiled, pieces[1:]):
            out += [self.image_text(t.rows, t.cols), rest]
        ids = encode_prompt(self.tokenizer, "".join(out))
        runs = token_runs(ids, self.image_token_id)
        units = [(img, k, px) for img, t in zip(images, tiled) for k, px in enumerate(t.pixels)]
        if len(runs) != len(units) or any(n != self.tokens_per_tile for _, n in runs):
            raise ValueError(f"messages: the prompt's image tokens form runs {[n for _, n in runs]}, expected "
                             f"{len(units)} of {self.tokens_per_tile}")
        return Prompt(ids, [FeatureSpan(start=start, length=n, data=px, content_hash=tile_hash(img.content_hash, k))
                            for (start, n), (img, k, px) in zip(runs, units)])


def tile_hash(content_hash: bytes, k: int) -> bytes:
    """Tile k of an image (row-major tiles, then the global one): keyed by the image's
    digest and k, so a repeated image reuses every tile's cached blocks while no two tiles
    of one image share a key."""
    return part_digest(content_hash, b"idefics3-tile", k)
