"""The core's own defaults, registered through the same hooks as any plugin."""
from mistralrs_core.hookspecs import hookimpl


@hookimpl
def mistralrs_register_loaders(register):
    register("safetensors", "mistralrs_core.loading.model_loader:SafetensorsLoader")
    register("adapters", "mistralrs_core.adapters.loader:AdapterLoader")


@hookimpl
def mistralrs_register_quantizers(register):
    register("none", "mistralrs_core.layers.linear:UnquantizedMethod")


@hookimpl
def mistralrs_register_samplers(register):
    register("default", "mistralrs_core.sampling.sampler:Sampler")


@hookimpl
def mistralrs_select_loader(which, kind):
    if type(which).__name__ == "Plain":
        return "safetensors"
    # LoRA / X-LoRA on any base: the base loads through its own loader first.
    if getattr(which, "adapter_kind", None) is not None:
        return "adapters"
    return None


@hookimpl(trylast=True)
def mistralrs_quant_method(quant_config, hf_name, module, weight):
    # The core keeps weights dense; a pre-quantized weight nobody claims is dequantized.
    return None


# Tool calling, the agentic loop, sessions and the produced-file store live in the core
# (mistralrs_core.agent), constrained decoding too (mistralrs_core.constrained, llguidance);
# draft-model and prompt-lookup speculation live in the engine (engine/speculative.py), AnyMoE
# in mistralrs_core/anymoe;
# MCP, web search, code execution and shell come from plugins.
CORE_CAPABILITIES = {"grammar": "mistralrs_core.constrained", "speculative": "mistralrs_core.engine.speculative",
                     "device_mapping": "mistralrs_core.distributed",
                     "anymoe": "mistralrs_core.anymoe",
                     "lora": "mistralrs_core.adapters",
                     **{name: "mistralrs_core.agent"
                        for name in ("tool_calling", "tool_callbacks", "agentic_loop", "sessions", "files")}}


@hookimpl
def mistralrs_register_capabilities(register):
    # One implementation per hook name in this module: a second def would replace the first.
    for name, where in CORE_CAPABILITIES.items():
        register(name, provides=where)


@hookimpl
def mistralrs_register_tool_providers(register):
    register("python_callbacks", "mistralrs_core.agent.callbacks:CallbackToolProvider")
