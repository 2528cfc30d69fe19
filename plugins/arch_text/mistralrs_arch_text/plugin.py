"""Entry point of ``mistralrs-arch-text``: the text and embedding families it provides."""
from mistralrs_core.hookspecs import hookimpl

_PKG = "mistralrs_arch_text"

# name, module:class, HF model_types, HF architectures, GGUF architectures
TEXT_FAMILIES = [
    ("Llama", f"{_PKG}.llama:LlamaForCausalLM", ("llama",), ("LlamaForCausalLM",), ("llama",)),
    ("Mistral", f"{_PKG}.mistral:MistralForCausalLM", ("mistral",), ("MistralForCausalLM",), ()),
    ("Phi2", f"{_PKG}.phi2:Phi2ForCausalLM", ("phi",), ("PhiForCausalLM",), ("phi2",)),
    ("Phi3", f"{_PKG}.phi3:Phi3ForCausalLM", ("phi3",), ("Phi3ForCausalLM",), ("phi3",)),
    ("Qwen2", f"{_PKG}.qwen2:Qwen2ForCausalLM", ("qwen2",), ("Qwen2ForCausalLM",), ("qwen2",)),
    ("Qwen3", f"{_PKG}.qwen3:Qwen3ForCausalLM", ("qwen3",), ("Qwen3ForCausalLM",), ("qwen3",)),
    ("GLM4", f"{_PKG}.glm4:Glm4ForCausalLM", ("glm4",), ("Glm4ForCausalLM",), ()),
    ("Starcoder2", f"{_PKG}.starcoder2:Starcoder2ForCausalLM", ("starcoder2",), ("Starcoder2ForCausalLM",),
     ("starcoder2",)),
    ("SmolLm3", f"{_PKG}.smollm3:SmolLM3ForCausalLM", ("smollm3",), ("SmolLM3ForCausalLM",), ("smollm3",)),
    ("Gemma", f"{_PKG}.gemma:GemmaForCausalLM", ("gemma",), ("GemmaForCausalLM",), ("gemma",)),
    ("Gemma2", f"{_PKG}.gemma2:Gemma2ForCausalLM", ("gemma2",), ("Gemma2ForCausalLM",), ("gemma2",)),
    # Text-only Gemma 3; the multimodal Gemma3 is a vision family registered elsewhere.
    ("Gemma3", f"{_PKG}.gemma3:Gemma3ForCausalLM", ("gemma3_text",), ("Gemma3ForCausalLM",), ("gemma3",)),
    # Mixture-of-experts, latent-attention and hybrid families.
    ("Mixtral", f"{_PKG}.mixtral:MixtralForCausalLM", ("mixtral",), ("MixtralForCausalLM",), ()),
    ("Phi3_5MoE", f"{_PKG}.phimoe:PhiMoEForCausalLM", ("phimoe",), ("PhimoeForCausalLM",), ()),
    ("Qwen3Moe", f"{_PKG}.qwen3_moe:Qwen3MoeForCausalLM", ("qwen3_moe",), ("Qwen3MoeForCausalLM",), ()),
    ("DeepseekV2", f"{_PKG}.deepseek_v2:DeepseekV2ForCausalLM", ("deepseek_v2",), ("DeepseekV2ForCausalLM",),
     ()),
    ("DeepseekV3", f"{_PKG}.deepseek_v3:DeepseekV3ForCausalLM", ("deepseek_v3",), ("DeepseekV3ForCausalLM",),
     ()),
    ("GptOss", f"{_PKG}.gpt_oss:GptOssForCausalLM", ("gpt_oss",), ("GptOssForCausalLM",), ()),
    ("GraniteMoeHybrid", f"{_PKG}.granitemoehybrid:GraniteMoeHybridForCausalLM", ("granitemoehybrid",),
     ("GraniteMoeHybridForCausalLM",), ()),
]


# name, module:class, HF model_types, HF architectures (detection among embedding families only)
EMBEDDING_FAMILIES = [
    ("EmbeddingGemma", f"{_PKG}.embedding_gemma:EmbeddingGemma", ("gemma3_text",), ("Gemma3TextModel",)),
    ("Qwen3Embedding", f"{_PKG}.qwen3_embedding:Qwen3Embedding", ("qwen3",), ("Qwen3Model",)),
]


@hookimpl
def mistralrs_register_architectures(register):
    for name, target, model_types, archs, gguf in TEXT_FAMILIES:
        register(name, target, kind="text", hf_model_types=model_types, hf_architectures=archs,
                 gguf_architectures=gguf)
    for name, target, model_types, archs in EMBEDDING_FAMILIES:
        register(name, target, kind="embedding", hf_model_types=model_types, hf_architectures=archs)


@hookimpl
def mistralrs_register_loaders(register):
    register("embedding", f"{_PKG}.embedding_loader:EmbeddingLoader")


@hookimpl
def mistralrs_select_loader(which, kind):
    if type(which).__name__ == "Embedding":
        return "embedding"
    return None
