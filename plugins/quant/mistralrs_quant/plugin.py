"""Entry point of ``mistralrs-quant``: GGUF and legacy GGML loading, the GGML block formats."""
from mistralrs_core.hookspecs import hookimpl

_GGML_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
               "Q5_K", "Q6_K", "Q8_K", "MXFP4")
# quantization_config.quant_method values whose checkpoints this plugin reads
_PREQUANTIZED = ("gptq", "awq", "fp8", "mxfp4")


@hookimpl
def mistralrs_register_loaders(register):
    register("gguf", "mistralrs_quant.gguf_loader:GGUFLoader")
    register("ggml", "mistralrs_quant.ggml_loader:GGMLLoader")


@hookimpl
def mistralrs_register_quantizers(register):
    for name in _GGML_TYPES:
        register(name, "mistralrs_quant.qlinear:GGUFQuantizedWeight", family="ggml")


@hookimpl
def mistralrs_select_loader(which, kind):
    return {"GGUF": "gguf", "GGML": "ggml"}.get(type(which).__name__)


@hookimpl
def mistralrs_quant_method(quant_config, hf_name, module, weight):
    # Imported here: listing plugins must not import torch or the kernels.
    if quant_config.kind in _PREQUANTIZED:
        from mistralrs_quant.prequantized import prequantized_quant_method
        method = prequantized_quant_method(weight)
        if method is not None:
            return method
    from mistralrs_quant.qlinear import gguf_quant_method
    return gguf_quant_method(quant_config, hf_name, module, weight)


@hookimpl
def mistralrs_packed_weights(quant_config, weights):
    if quant_config.kind not in _PREQUANTIZED:
        return None
    from mistralrs_quant.prequantized import packed_weights
    return packed_weights(quant_config, weights)
