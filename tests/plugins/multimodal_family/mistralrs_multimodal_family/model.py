"""A Qwen2-layout decoder whose prompts may hold images.

Each image becomes ``GRID * GRID`` placeholder tokens whose embeddings are replaced by
``tanh(visual_proj(pixel))`` (one pixel = one patch: the "encoder" is deliberately tiny),
and rope positions follow Qwen2-VL's M-RoPE rule: text tokens count up on all three axes;
an image's tokens share the temporal position of its first token and take (row, col)
offsets on the height and width axes; the text after an image resumes at the image's
start + GRID.
"""
from __future__ import annotations

import numpy as np
import torch

from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.rope import MultiAxisRotaryEmbedding
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config
from mistralrs_core.models.positions import PromptPositions

GRID = 2                 # images are GRID x GRID pixels, one token each


class TinyMMForCausalLM(DecoderLM):
    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "TinyMMForCausalLM":
        model = cls(cls.config_from_hf(hf), dtype)
        sections = hf["rope_scaling"]["mrope_section"]
        model.rope = MultiAxisRotaryEmbedding(model.cfg.rope, sections)
        model.visual_proj = Linear(hf["patch_dim"], hf["hidden_size"], bias=True)
        model.image_token_id = hf["image_token_id"]
        return model

    @classmethod
    def config_from_hf(cls, hf):
        return base_config(hf, qkv_bias=True)       # Qwen2's layout

    def encode_features(self, spans):
        pixels = torch.stack([s.data for s in spans]).to(self.dtype)       # [images, GRID*GRID, patch]
        return list(torch.tanh(self.visual_proj(pixels)))

    def prompt_positions(self, prompt_ids, spans):
        if not spans:
            return None                       # text only: equal axes, i.e. plain positions
        n = len(prompt_ids)
        pos = np.empty((3, n), dtype=np.int64)
        i, nxt = 0, 0
        for span in sorted(spans, key=lambda s: s.start):
            text = span.start - i
            pos[:, i:span.start] = np.arange(nxt, nxt + text)
            nxt += text
            rows, cols = np.divmod(np.arange(span.length), GRID)
            pos[0, span.start:span.end] = nxt
            pos[1, span.start:span.end] = nxt + rows
            pos[2, span.start:span.end] = nxt + cols
            nxt += GRID
            i = span.end
        pos[:, i:] = np.arange(nxt, nxt + n - i)
        nxt += n - i
        return PromptPositions(pos, delta=nxt - n)
