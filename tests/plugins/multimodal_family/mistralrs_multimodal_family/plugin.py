"""Registered only through this distribution's entry point, like a third-party family."""
from mistralrs_core.hookspecs import hookimpl


@hookimpl
def mistralrs_register_architectures(register):
    register("TinyMM", "mistralrs_multimodal_family.model:TinyMMForCausalLM", kind="text",
             hf_model_types=("mistralrs_tiny_mm",), hf_architectures=("MistralrsTinyMMForCausalLM",),
             pipeline="mistralrs_multimodal_family.pipeline:TinyMMPipeline")
