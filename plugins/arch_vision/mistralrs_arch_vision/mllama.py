"""Mllama (Llama 3.2 Vision): a tiled ViT whose output the text model reads through
cross-attention layers, not through spliced placeholder tokens.

The ``<|image|>`` token stays an ordinary token (its own embedding). It is the image's
``FeatureSpan`` of length 1, so the image's content hash keys the prefix cache; its
"features" are the projected vision states of the whole image, [1, keys, hidden + 1] (the
last channel flags the keys of real tiles; see ``encode_features``). ``merge_features``
keeps the embeddings and remembers which step row brought which image; ``forward_embeds``
maps rows to sequences (``meta.query_lens``), stores each new image's per-layer K/V in the
sequence's state slot of every cross layer's ``CrossAttentionCache`` and remembers, per
slot, the image token's position and its number of real keys.

Masks follow transformers' ``cross_attention_mask``: a token at or after the image token
sees the keys of the image's real tiles; a token before it sees none (the backend then lets
it attend every key and zeroes its feed-forward branch: ``full_text_row_masked_out_mask``);
decode tokens extend the last prompt row. A sequence without an image sees no key, which
makes each cross layer the identity, as transformers skips them. Several images per prompt
follow transformers' ranges (each image from its token to the next image's).
"""
from __future__ import annotations

import attrs
import torch
from torch import nn

from mistralrs_core.layers.attention_backends import CrossAttentionBatch, CrossAttentionCache, cross_attention
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.mlp import GatedMLP
from mistralrs_core.layers.norms import RMSNorm
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import ImagePrompt
from mistralrs_arch_vision.processors.mllama import MllamaImageProcessor
from mistralrs_arch_vision.towers.mllama import MllamaVisionConfig, MllamaVisionTower

# transformers' MllamaTextConfig defaults (hub configs may omit them).
TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                     rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                     tie_word_embeddings=False, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38])


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class MllamaCrossAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = Linear(d, self.nh * self.hd)
        self.k_proj = Linear(d, self.nkv * self.hd)
        self.v_proj = Linear(d, self.nkv * self.hd)
        self.o_proj = Linear(self.nh * self.hd, d)
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps)

    def forward(self, x, new, batch: CrossAttentionBatch, cache: CrossAttentionCache):
        """``new``: (packed vision states [keys, hidden] of ``batch.new_slots``, the keys each
        of them gains), or None on steps without new images."""
        t = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(t, self.nh, self.hd))
        k = v = None
        if new is not None:
            states, gained = new
            k = self.k_norm(self.k_proj(states).view(-1, self.nkv, self.hd))
            v = self.v_proj(states).view(-1, self.nkv, self.hd)
            k, v = _with_held_keys(k, v, batch, gained, cache)
        out = cross_attention(q, k, v, batch, cache, scale=self.hd ** -0.5)
        return self.o_proj(out.reshape(t, self.nh * self.hd))


def _with_held_keys(k, v, batch, gained, cache):
    """A sequence's later image (a later prefill chunk) adds to the keys its slot holds:
    ``batch.new_lens`` count all of them, ``gained`` the new ones in k/v."""
    if all(cache.length(s) == 0 for s in batch.new_slots):
        return k, v
    ks, vs, off = [], [], 0
    for slot, n in zip(batch.new_slots, gained):
        if cache.length(slot):
            old_k, old_v, _ = cache.gather([slot])
            ks.append(old_k[0])
            vs.append(old_v[0])
        ks.append(k[off:off + n])
        vs.append(v[off:off + n])
        off += n
    return torch.cat(ks), torch.cat(vs)


class MllamaCrossLayer(nn.Module):
    """``MllamaCrossAttentionDecoderLayer``: tanh-gated cross-attention and gated MLP.
    Holds its ``CrossAttentionCache`` (one entry per state slot)."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.cross_attn = MllamaCrossAttention(cfg)
        self.cross_attn_attn_gate = _param(1)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.cross_attn_mlp_gate = _param(1)
        self.cache = CrossAttentionCache(1)

    def ensure_slots(self, n: int) -> None:
        # The engine does not tell a model its number of state slots (max_seqs), so the
        # cache grows to the largest slot seen, keeping what it holds.
        if n <= self.cache.max_seqs:
            return
        old = self.cache
        self.cache = CrossAttentionCache(max(n, 2 * old.max_seqs))
        for s in range(old.max_seqs):
            if old.length(s):
                k, v, _ = old.gather([s])
                self.cache.store(s, k[0], v[0])

    def forward(self, h, new, batch: CrossAttentionBatch):
        a = self.cross_attn(self.input_layernorm(h), new, batch, self.cache)
        h = h + self.cross_attn_attn_gate.tanh() * a
        m = self.mlp(self.post_attention_layernorm(h))
        m = m * batch.text_row_mask(self.cache, h.device).to(m.dtype)[:, None]
        return h + self.cross_attn_mlp_gate.tanh() * m


@attrs.frozen
class SlotImage:
    position: int      # the image token's index in the sequence
    real_keys: int     # keys of the image's real tiles (the rest are padding tiles)
    offset: int        # its first key in the slot (images are stored in prompt order)


_PREFIXES = (  # checkpoint prefix -> module-tree prefix (first match wins)
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


class MllamaForConditionalGeneration(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    uses_state_slots = True
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "MllamaForConditionalGeneration":
        text = {**TEXT_DEFAULTS, **(hf.get("text_config") or {})}
        model = cls(base_config(text), dtype)
        cfg = model.cfg
        model.cross_layers = sorted(int(i) for i in text["cross_attention_layers"])
        for i in model.cross_layers:
            model.model.layers[i] = MllamaCrossLayer(cfg)
        # The reference's table has 8 rows past the vocabulary (the image token's among them).
        model.model.embed_tokens = Embedding(cfg.vocab_size + 8, cfg.hidden_size)
        vision = MllamaVisionConfig.from_hf(hf.get("vision_config") or {})
        model.vision_model = MllamaVisionTower(vision)
        model.multi_modal_projector = Linear(vision.vision_output_dim, cfg.hidden_size, bias=True)
        model.image_token_id = int(hf.get("image_token_index", hf.get("image_token_id", 128256)))
        model.keys_per_image = vision.max_num_tiles * vision.tokens_per_tile
        model.slot_images: dict[int, list[SlotImage]] = {}
        model._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        return model

    def kv_cache_specs(self):
        specs = super().kv_cache_specs()
        return [None if i in self.cross_layers else s for i, s in enumerate(specs)]

    def map_weight_name(self, name):
        name = self.rename_checkpoint(name)
        return super().map_weight_name(name)

    # --- images -------------------------------------------------------------
    def encode_features(self, spans):
        """Per span [1, keys, hidden + 1]: the projected vision states of every tile (real
        and padding: masked-out rows attend them all, as in the reference) and, last channel,
        1.0 on the keys of real tiles. The flag travels with the features because
        ``merge_features`` sees only feature rows, and a preempted sequence's features are
        reused without a new ``encode_features`` call."""
        dev = self.lm_device
        pixels = torch.stack([s.data.pixel_values for s in spans]).to(device=dev, dtype=self.dtype)
        ratio_ids = torch.tensor([s.data.aspect_ratio_id for s in spans], device=dev)
        tile_mask = torch.stack([s.data.tile_mask for s in spans]).to(dev)
        states = self.multi_modal_projector(self.vision_model(pixels, ratio_ids, tile_mask))
        b = len(spans)
        per_tile = self.vision_model.cfg.tokens_per_tile
        real = tile_mask[:, :, None].expand(-1, -1, per_tile).reshape(b, -1, 1).to(states.dtype)
        return list(torch.cat([states.reshape(b, -1, states.shape[-1]), real], dim=-1)[:, None])

    def merge_features(self, embeds, rows, features):
        # The image token keeps its own embedding; its image reaches the cross layers when
        # the sequence is admitted (admit_features).
        return embeds

    def admit_features(self, index: int, spans) -> None:
        """Every image of sequence ``index`` of the step, on its first step in its slot: text
        before an image attends it too, and a prefix hit may start past the image token."""
        self._pending.append((index, [(s.start, s.features) for s in sorted(spans, key=lambda s: s.start)]))

    def _take_images(self, positions, meta) -> tuple[list[int], list[int], list[int], torch.Tensor | None]:
        """Images admitted this step, grouped by sequence: (slots, keys each slot holds after
        this step, keys each slot gains, packed new states in slot order)."""
        pending, self._pending = self._pending, []
        arriving: dict[int, list[torch.Tensor]] = {}
        for index, images in pending:
            slot = int(meta.state_slots[index])
            for position, feats in images:
                f = feats.reshape(-1, feats.shape[-1])
                held = self.slot_images.setdefault(slot, [])
                offset = held[-1].offset + self.keys_per_image if held else 0
                held.append(SlotImage(position, int(f[:, -1].sum().item()), offset))
                arriving.setdefault(slot, []).append(f[:, :-1])
        if not arriving:
            return [], [], [], None
        slots = list(arriving)
        gained = [sum(f.shape[0] for f in arriving[s]) for s in slots]
        totals = [len(self.slot_images[s]) * self.keys_per_image for s in slots]
        states = torch.cat([f for s in slots for f in arriving[s]]).to(self.dtype)
        return slots, totals, gained, states

    def _key_mask(self, slots: list[int], positions: torch.Tensor, meta) -> torch.Tensor | None:
        """[T, keys]: per token, the real-tile keys of the images it follows (transformers'
        cross_attention_mask: an image is seen from its token up to the next image token
        that does not directly follow it, or to the end; decode rows extend the last row)."""
        if not any(self.slot_images.get(s) for s in slots):
            return None
        width = max(len(self.slot_images.get(s, ())) for s in slots) * self.keys_per_image
        mask = torch.zeros(positions.shape[0], width, dtype=torch.bool, device=positions.device)
        cols = torch.arange(width, device=positions.device)
        off = 0
        for slot, n in zip(slots, meta.query_lens):
            images = self.slot_images.get(slot, [])
            pos = positions[off:off + n]
            for j, img in enumerate(images):
                k = j + 1
                while k < len(images) and images[k].position == images[k - 1].position + 1:
                    k += 1
                end = images[k].position if k < len(images) else None
                rows = pos >= img.position
                if end is not None:
                    rows &= pos < end
                keys = (cols >= img.offset) & (cols < img.offset + img.real_keys)
                mask[off:off + n] |= rows[:, None] & keys[None, :]
            off += n
        return mask

    def forward_embeds(self, h, positions, meta, caches):
        if meta.state_slots is None:
            raise ValueError("Mllama needs state slots (AttentionMetadata.state_slots)")
        slots = [int(s) for s in meta.state_slots.tolist()]
        layers = [self.model.layers[i] for i in self.cross_layers]
        for layer in layers:
            layer.ensure_slots(max(slots) + 1)
        for slot, fresh in zip(slots, meta.fresh_slots or [False] * len(slots)):
            if fresh:  # the slot held another (finished or preempted) sequence's image
                self.slot_images.pop(slot, None)
                for layer in layers:
                    layer.cache.clear(slot)
        new_slots, new_lens, gained, states = self._take_images(positions, meta)
        batch = CrossAttentionBatch(meta=meta, slots=slots, new_slots=new_slots, new_lens=new_lens,
                                    key_mask=self._key_mask(slots, positions, meta))
        new = None if states is None else (states, gained)
        cs = self.rope.cos_sin(positions, h.dtype)
        cross = set(self.cross_layers)
        for i, layer in enumerate(self.model.layers):
            if i in cross:
                h = layer(h, new, batch)
            else:
                h = layer(h, cs, meta, caches[i] if caches is not None else None)
        return self.model.norm(h)


@attrs.define
class MllamaImageData:
    """What the tower takes for one image."""
    pixel_values: torch.Tensor    # [max_tiles, 3, tile, tile]
    aspect_ratio_id: int
    tile_mask: torch.Tensor       # [max_tiles] 1 for real tiles


@attrs.define
class MllamaProcessor:
    image_processor: MllamaImageProcessor
    image_token_id: int
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "MllamaProcessor":
        proc = MllamaImageProcessor.from_config(preprocessor_config)
        vc = model.vision_model.cfg
        if proc.tile_size != vc.image_size or proc.max_image_tiles != vc.max_num_tiles:
            raise ValueError(f"preprocessor_config.json: tiles of {proc.tile_size} x {proc.max_image_tiles} do "
                             f"not match the vision tower's {vc.image_size} x {vc.max_num_tiles}")
        return cls(proc, model.image_token_id)

    def prepare(self, image) -> ImagePrompt:
        out = self.image_processor(image)
        return ImagePrompt(1, MllamaImageData(out.pixel_values, out.aspect_ratio_id, out.tile_mask))
