"""A third-party family: registered only through this distribution's entry point."""
from mistralrs_core.hookspecs import hookimpl


@hookimpl
def mistralrs_register_architectures(register):
    register("TinyTest", "mistralrs_tiny_family.model:TinyForCausalLM", kind="text",
             hf_model_types=("mistralrs_tiny",), hf_architectures=("MistralrsTinyForCausalLM",))
