"""What every vision-language model of the plugin shares: checkpoint names mapped onto its
module tree, and the device its text model (and so every input) lives on."""
from __future__ import annotations

import torch


class VisionFamilyMixin:
    """Mixed in before the family's ``DecoderLM`` base."""

    #: (checkpoint prefix, module-tree prefix); the first matching prefix is replaced. The
    #: hub's and transformers 5's layouts of one family differ only in these.
    checkpoint_prefixes: tuple[tuple[str, str], ...] = ()
    #: attributes holding a tower whose ``compile_encoder()`` its ``forward`` uses (CLIP,
    #: SigLIP at one image size); the loader compiles them once after the weights are in
    compiled_towers: tuple[str, ...] = ()

    def compile_for_inference(self) -> None:
        """Compile the towers named in ``compiled_towers`` where towers/compiled.py's setting
        says so (CPU, big tower, a C++ compiler); a failure leaves them eager."""
        for name in self.compiled_towers:
            getattr(self, name).compile_encoder()

    def rename_checkpoint(self, name: str) -> str:
        for src, dst in self.checkpoint_prefixes:
            if name.startswith(src):
                return dst + name[len(src):]
        return name

    @property
    def lm_device(self) -> torch.device:
        return self.model.embed_tokens.weight.device
