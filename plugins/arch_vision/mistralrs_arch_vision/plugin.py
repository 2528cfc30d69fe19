"""Registrations of mistralrs-arch-vision (entry point ``arch_vision``). Targets are
``"module:attr"`` strings: listing plugins imports no model code."""
from mistralrs_core.hookspecs import hookimpl

_PKG = "mistralrs_arch_vision"

# (enum name, aliases, model class, HF model_types, HF architectures, processor)
VISION_FAMILIES = [
    ("LLaVa", ("LLaVA",), f"{_PKG}.llava:LlavaForConditionalGeneration", ("llava",),
     ("LlavaForConditionalGeneration",), f"{_PKG}.llava:LlavaProcessor"),
    ("Gemma3", (), f"{_PKG}.gemma3:Gemma3ForConditionalGeneration", ("gemma3",),
     ("Gemma3ForConditionalGeneration",), f"{_PKG}.gemma3:Gemma3Processor"),
    ("LLaVaNext", ("LLaVANext",), f"{_PKG}.llava_next:LlavaNextForConditionalGeneration",
     ("llava_next",), ("LlavaNextForConditionalGeneration",), f"{_PKG}.llava_next:LlavaNextProcessor"),
    ("Mistral3", (), f"{_PKG}.mistral3:Mistral3ForConditionalGeneration", ("mistral3",),
     ("Mistral3ForConditionalGeneration",), f"{_PKG}.mistral3:Mistral3Processor"),
    ("Idefics2", (), f"{_PKG}.idefics2:Idefics2ForConditionalGeneration", ("idefics2",),
     ("Idefics2ForConditionalGeneration",), f"{_PKG}.idefics2:Idefics2Processor"),
    ("Idefics3", (), f"{_PKG}.idefics3:Idefics3ForConditionalGeneration", ("idefics3",),
     ("Idefics3ForConditionalGeneration",), f"{_PKG}.idefics3:Idefics3Processor"),
    ("VLlama", ("Mllama",), f"{_PKG}.mllama:MllamaForConditionalGeneration", ("mllama",),
     ("MllamaForConditionalGeneration",), f"{_PKG}.mllama:MllamaProcessor"),
    ("Llama4", (), f"{_PKG}.llama4:Llama4ForConditionalGeneration", ("llama4",),
     ("Llama4ForConditionalGeneration",), f"{_PKG}.llama4:Llama4Processor"),
    ("Phi3V", (), f"{_PKG}.phi3v:Phi3VForCausalLM", ("phi3_v",), ("Phi3VForCausalLM",),
     f"{_PKG}.phi3v:Phi3VProcessor"),
    ("MiniCpmO", (), f"{_PKG}.minicpmo:MiniCPMOForConditionalGeneration", ("minicpmo", "minicpmv"),
     ("MiniCPMO", "MiniCPMV"), f"{_PKG}.minicpmo:MiniCpmOProcessor"),
    ("Phi4MM", (), f"{_PKG}.phi4mm:Phi4MMForCausalLM", ("phi4_multimodal", "phi4mm"),
     ("Phi4MultimodalForCausalLM", "Phi4MMForCausalLM"), f"{_PKG}.phi4mm:Phi4MMProcessor"),
    ("Gemma3n", (), f"{_PKG}.gemma3n:Gemma3nForConditionalGeneration", ("gemma3n",),
     ("Gemma3nForConditionalGeneration",), f"{_PKG}.gemma3n:Gemma3nProcessor"),
    ("Qwen2VL", (), f"{_PKG}.qwen2_vl:Qwen2VLForConditionalGeneration", ("qwen2_vl",),
     ("Qwen2VLForConditionalGeneration",), f"{_PKG}.qwen2_vl:Qwen2VLProcessor"),
    ("Qwen2_5VL", (), f"{_PKG}.qwen2_vl:Qwen2_5_VLForConditionalGeneration", ("qwen2_5_vl",),
     ("Qwen2_5_VLForConditionalGeneration",), f"{_PKG}.qwen2_vl:Qwen2VLProcessor"),
    ("Qwen3VL", (), f"{_PKG}.qwen3_vl:Qwen3VLForConditionalGeneration", ("qwen3_vl",),
     ("Qwen3VLForConditionalGeneration",), f"{_PKG}.qwen2_vl:Qwen2VLProcessor"),
    ("Qwen3VLMoE", (), f"{_PKG}.qwen3_vl_moe:Qwen3VLMoeForConditionalGeneration", ("qwen3_vl_moe",),
     ("Qwen3VLMoeForConditionalGeneration",), f"{_PKG}.qwen2_vl:Qwen2VLProcessor"),
]


@hookimpl
def mistralrs_register_architectures(register):
    for name, aliases, target, model_types, archs, processor in VISION_FAMILIES:
        register(name, target, kind="vision", hf_model_types=model_types, hf_architectures=archs,
                 aliases=aliases, processor=processor, pipeline=f"{_PKG}.pipeline:VisionPipeline")


@hookimpl
def mistralrs_register_loaders(register):
    register("vision", f"{_PKG}.loader:VisionLoader")


@hookimpl
def mistralrs_select_loader(which, kind):
    if type(which).__name__ == "VisionPlain":
        return "vision"
    return None


@hookimpl
def mistralrs_register_capabilities(register):
    register("vision", provides="Which.VisionPlain (LLaVa, LLaVaNext, Gemma3, Mistral3, Idefics2, Idefics3, VLlama, Llama4, Phi3V, MiniCpmO, Phi4MM (image + audio), Gemma3n (image + audio), Qwen2VL, Qwen2_5VL, Qwen3VL, Qwen3VLMoE)")
