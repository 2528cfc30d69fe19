"""Chat messages with ``image_url`` parts -> placeholder tokens + FeatureSpans."""
from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import torch
from PIL import Image

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.pipeline.requests import normalize_messages
from mistralrs_core.pipeline.text import Prompt, TextPipeline
from mistralrs_core.tokenization.prompt import render_chat

from .model import GRID

_MARK = "\x00IMG\x00"


def load_image(url: str) -> torch.Tensor:
    """A data URL -> [GRID * GRID, 3] pixel patches in [0, 1]."""
    if not url.startswith("data:") or ";base64," not in url:
        raise ValueError("image_url: only base64 data URLs are accepted by this test family")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))).convert("RGB")
    img = img.resize((GRID, GRID), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).reshape(GRID * GRID, 3) / 255.0)


class TinyMMPipeline(TextPipeline):
    def chat_prompt(self, req) -> Prompt:
        if isinstance(req.messages, str):
            return super().chat_prompt(req)
        messages, images = normalize_messages(req.messages), []
        for m in messages:
            if isinstance(m.get("content"), list):
                text = []
                for part in m["content"]:
                    if part.get("type") == "image_url":
                        ref = part["image_url"]
                        images.append(load_image(ref["url"] if isinstance(ref, dict) else ref))
                        text.append(_MARK)
                    else:
                        text.append(part.get("text", ""))
                m["content"] = "".join(text)
        rendered = render_chat(self.template, self.tokenizer, messages)
        pieces = rendered.split(_MARK)
        ids, spans = [], []
        image_id = self.model.image_token_id
        for k, piece in enumerate(pieces):
            ids += self.tokenizer.encode(piece, add_special_tokens=False) if piece else []
            if k < len(images):
                pixels = images[k]
                spans.append(FeatureSpan(start=len(ids), length=GRID * GRID, data=pixels,
                                         content_hash=hashlib.blake2b(pixels.numpy().tobytes()).digest()))
                ids += [image_id] * (GRID * GRID)
        return Prompt(ids, spans)
