"""Entry point of ``mistralrs-quant``: GGUF and legacy GGML loading, the GGML block formats."""
from mistralrs_core.hookspecs import hookimpl

_GGML_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
               "Q5_K", "Q6_K", "Q8_K", "MXFP4")
# quantization_config.quant_method values whose checkpoints this plugin reads
_PREQUANTIZED = ("gptq", "awq", "fp8", "mxfp4")

_ISQ_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2K", "Q3K", "Q4K", "Q5K", "Q6K", "Q8K", "HQQ4",
              "HQQ8", "FP8", "AFQ2", "AFQ3", "AFQ4", "AFQ6", "AFQ8", "F8Q8", "MXFP4")


@hookimpl
def mistralrs_register_loaders(register):
    register("gguf", "mistralrs_quant.gguf_loader:GGUFLoader")
    register("ggml", "mistralrs_quant.ggml_loader:GGMLLoader")
    register("isq", "mistralrs_quant.isq.loader:IsqLoader")


@hookimpl
def mistralrs_register_quantizers(register):
    for name in _GGML_TYPES:
        register(name, "mistralrs_quant.qlinear:GGUFQuantizedWeight", family="ggml")
    # ISQ type names (the registry with their classes is mistralrs_quant.isq.types, which
    # imports torch: listing plugins must not).
    for name in _ISQ_TYPES:
        register(f"isq:{name}", "mistralrs_quant.isq.types:TYPES", family="isq")


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
    if quant_config.kind == "isq":
        from mistralrs_quant.isq.hook import isq_quant_method
        return isq_quant_method(quant_config, hf_name, module, weight)
    if quant_config.kind == "uqff":
        from mistralrs_quant.isq.uqff import uqff_quant_method
        method = uqff_quant_method(quant_config, hf_name, module, weight)
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


@hookimpl
def mistralrs_register_decode_attention(register):
    # The target module imports triton only when the kernel first runs.
    register("triton", "mistralrs_quant.kernels.triton.dispatch:decode_attention", device_types=("cuda",))


@hookimpl
def mistralrs_register_dense_kernels(register):
    # The target module loads the C++ library only when a layer first asks it.
    register("cpp", "mistralrs_quant.kernels.dense:kernel", device_types=("cpu",))


# ISQ, topology files, UQFF and importance matrices for Which.Plain text models and
# Which.VisionPlain models (mistralrs_quant.isq; the vision loader calls
# IsqLoader.build_model); other model kinds refuse them (runner._check_quant_args).
_CAPABILITIES = {"isq": "mistralrs_quant.isq", "topology": "mistralrs_quant.isq.topology",
                 "uqff": "mistralrs_quant.isq.uqff", "imatrix": "mistralrs_quant.isq.imatrix"}


@hookimpl
def mistralrs_register_capabilities(register):
    for name, where in _CAPABILITIES.items():
        register(name, provides=where)
