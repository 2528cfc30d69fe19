"""What every vision-language model of the plugin shares: checkpoint names mapped onto its
module tree, and the device its text model (and so every input) lives on."""
from __future__ import annotations

import torch


class VisionFamilyMixin:
    """Mixed in before the family's ``DecoderLM`` base."""

    #: (checkpoint prefix, module-tree prefix); the first matching prefix is replaced. The
    #: hub's and transformers 5's layouts of one family differ only in these.
    checkpoint_prefixes: tuple[tuple[str, str], ...] = ()

    def rename_checkpoint(self, name: str) -> str:
        for src, dst in self.checkpoint_prefixes:
            if name.startswith(src):
                return dst + name[len(src):]
        return name

    @property
    def lm_device(self) -> torch.device:
        return self.model.embed_tokens.weight.device
