"""Entry point of ``mistralrs-arch-text``: the text and embedding families it provides."""
from mistralrs_core.hookspecs import hookimpl

_PKG = "mistralrs_arch_text"

# name, module:class, HF model_types, HF architectures, GGUF architectures
TEXT_FAMILIES = [
    ("Llama", f"{_PKG}.llama:LlamaForCausalLM", ("llama",), ("LlamaForCausalLM",), ("llama",)),
    ("Mistral", f"{_PKG}.mistral:MistralForCausalLM", ("mistral",), ("MistralForCausalLM",), ()),
]


@hookimpl
def mistralrs_register_architectures(register):
    for name, target, model_types, archs, gguf in TEXT_FAMILIES:
        register(name, target, kind="text", hf_model_types=model_types, hf_architectures=archs,
                 gguf_architectures=gguf)
