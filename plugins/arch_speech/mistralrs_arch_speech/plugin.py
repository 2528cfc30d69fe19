"""Registrations of mistralrs-arch-speech (entry point ``arch_speech``). Targets are
``"module:attr"`` strings: listing plugins imports no model code."""
from mistralrs_core.hookspecs import hookimpl

_PKG = "mistralrs_arch_speech"


@hookimpl
def mistralrs_register_architectures(register):
    register("Dia", f"{_PKG}.dia:DiaModel", kind="speech", hf_model_types=("dia",),
             hf_architectures=("DiaForConditionalGeneration",), pipeline=f"{_PKG}.pipeline:DiaPipeline")


@hookimpl
def mistralrs_register_loaders(register):
    register("speech", f"{_PKG}.loader:SpeechLoader")


@hookimpl
def mistralrs_select_loader(which, kind):
    if type(which).__name__ == "Speech":
        return "speech"
    return None


@hookimpl
def mistralrs_register_capabilities(register):
    register("speech", provides="Which.Speech (Dia with the DAC codec): Runner.generate_audio, POST /v1/audio/speech")
