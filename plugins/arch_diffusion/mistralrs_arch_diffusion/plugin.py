"""Registrations of mistralrs-arch-diffusion (entry point ``arch_diffusion``). Targets are
``"module:attr"`` strings: listing plugins imports no model code."""
from mistralrs_core.hookspecs import hookimpl

_PKG = "mistralrs_arch_diffusion"


@hookimpl
def mistralrs_register_loaders(register):
    register("diffusion", f"{_PKG}.loader:DiffusionLoader")


@hookimpl
def mistralrs_select_loader(which, kind):
    if type(which).__name__ == "DiffusionPlain":
        return "diffusion"
    return None


@hookimpl
def mistralrs_register_capabilities(register):
    register("diffusion", provides="Which.DiffusionPlain (Flux, FluxOffloaded)")
