"""LoRA and X-LoRA adapters on top of any loaded text model (dense, ISQ'd, GGUF/GGML).

* ``peft_config``: a PEFT ``adapter_config.json`` (rank, alpha, rsLoRA, targets, bias mode).
* ``ordering``: upstream's ordering file and where each adapter's files are.
* ``weights``: one adapter's tensors, checked against the base model's layers.
* ``lora``: the runtime: per-layer low-rank updates, routed per token by the step's adapter
  ids, or merged into dense weights when one adapter serves everything.
* ``xlora``: the X-LoRA classifier and its two-pass forward.
* ``loader``: the ``Which.Lora*`` / ``Which.XLora*`` loader.
"""
from mistralrs_core.adapters.lora import AdapterRuntime, request_adapter_id  # noqa: F401  (the package API)
