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

    #: top-level attributes holding the language model (``DecoderLM``'s decoder stack and
    #: head); every other child is a tower, projector or encoder of another modality
    text_modules: tuple[str, ...] = ("model", "lm_head")

    def isq_dense_modules(self):
        """The children in-situ quantization leaves dense: all but the language model.
        Upstream's vision loaders list only the text decoder's layers for ISQ (LLaVA:
        ``language_model`` layers and ``lm_head``) and save the tower and projector as
        residual tensors."""
        return [child for name, child in self.named_children() if name not in self.text_modules]

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
        weight = self.model.embed_tokens.weight
        if weight is not None:
            return weight.device
        # A quantized embedding (in-situ quantization) holds no dense weight; the first
        # dense tensor of the language model (layer 0's norm) sits on the same device.
        return next(self.model.parameters()).device
