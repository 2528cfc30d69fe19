"""What this installation can do: one table decides which arguments raise ``NotAvailableYet``.

The core knows every capability the SDK surface can ask for (``KNOWN``): the request
fields, ``Runner`` arguments, ``Which`` fields and methods that need it, and the
distribution expected to provide it. A plugin that implements one registers its name
through ``mistralrs_register_capabilities``; until some installed plugin does, every
argument that needs it is refused with an error naming the distribution to install.

The table is only the gate: a plugin that registers a capability must really handle the
arguments listed here for it, since nothing else refuses them once the gate is open.
"""
from __future__ import annotations

from typing import Any, Iterable

import attrs

from mistralrs_core.errors import NotAvailableYet

_CORE_LATER = "a later mistralrs-core"
_CORE = "mistralrs-core"   # provided by the core itself (registered in defaults.py)


@attrs.frozen
class Capability:
    name: str
    what: str                           # human words for error messages
    distribution: str                   # what to install to get it
    request_fields: tuple[str, ...] = ()
    runner_args: tuple[str, ...] = ()
    which_fields: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()       # Runner methods that need it


KNOWN: dict[str, Capability] = {c.name: c for c in (
    Capability("grammar", "constrained decoding", _CORE, request_fields=("grammar",)),
    Capability("tool_calling", "tool calling", _CORE, request_fields=("tool_schemas",)),
    Capability("tool_callbacks", "Python tool callbacks", _CORE, runner_args=("tool_callbacks",)),
    Capability("mcp", "the MCP client", "mistralrs-tools-mcp", runner_args=("mcp_client_config",)),
    Capability("web_search", "web search", "mistralrs-tools-mcp",
               request_fields=("web_search_options",),
               runner_args=("enable_search", "search_embedding_model", "search_callback")),
    Capability("code_execution", "code execution", "mistralrs-tools-mcp",
               request_fields=("enable_code_execution",), runner_args=("code_execution_config",)),
    Capability("shell", "the shell tool", "mistralrs-tools-mcp",
               request_fields=("enable_shell",), runner_args=("shell_config",)),
    Capability("agentic_loop", "the agentic tool loop", _CORE, request_fields=("max_tool_rounds",)),
    # Dispatching calls to an HTTP endpoint and files handed to/asked of tools need the
    # sandboxed tools (code execution); the loop, sessions and the file store are core.
    Capability("tool_dispatch", "HTTP tool dispatch", "mistralrs-tools-mcp",
               request_fields=("tool_dispatch_url",)),
    Capability("sessions", "agentic sessions", _CORE, request_fields=("session_id",),
               methods=("export_session", "import_session", "delete_session", "list_session_ids")),
    Capability("files", "the store of files tools produced", _CORE, methods=("find_file",)),
    Capability("file_io", "file inputs and requested output files", "mistralrs-tools-mcp",
               request_fields=("files", "input_files")),
    # Provided by the core itself (defaults.py): mistralrs_core/adapters.
    Capability("lora", "LoRA adapters", _CORE, request_fields=("adapter",)),
    # Provided by the core itself (defaults.py): engine/speculative.py.
    Capability("speculative", "speculative decoding", "mistralrs-core", runner_args=("which_draft",)),
    Capability("mtp", "multi-token prediction", _CORE_LATER, runner_args=("mtp_model",)),
    # Provided by the core itself (defaults.py): mistralrs_core/anymoe.
    Capability("anymoe", "AnyMoE", _CORE, runner_args=("anymoe_config",)),
    # Provided by the core itself (defaults.py): mistralrs_core/distributed/device_map.py.
    Capability("device_mapping", "manual device mapping", _CORE, runner_args=("num_device_layers",)),
    Capability("isq", "in-situ quantization", "mistralrs-quant", runner_args=("in_situ_quant",),
               which_fields=("organization",), methods=("send_re_isq",)),
    Capability("topology", "per-layer device/quantization topology", "mistralrs-quant",
               which_fields=("topology",)),
    Capability("uqff", "UQFF files", "mistralrs-quant", which_fields=("from_uqff", "write_uqff")),
    Capability("imatrix", "imatrix-guided quantization", "mistralrs-quant",
               which_fields=("calibration_file", "imatrix")),
    Capability("matformer", "MatFormer slicing", _CORE_LATER,
               which_fields=("matformer_config_path", "matformer_slice_name")),
    # Model kinds: their Which variants are gated by loader selection; these entries name
    # the distribution in the error when no loader takes the variant.
    Capability("vision", "vision models", "mistralrs-arch-vision"),
    Capability("diffusion", "image generation models", "mistralrs-arch-diffusion"),
    Capability("speech", "speech generation models", "mistralrs-arch-speech"),
)}

_BY_REQUEST_FIELD = {f: c for c in KNOWN.values() for f in c.request_fields}
_BY_RUNNER_ARG = {a: c for c in KNOWN.values() for a in c.runner_args}
_BY_WHICH_FIELD = {f: c for c in KNOWN.values() for f in c.which_fields}

# Which variant kinds -> the capability whose distribution loads them.
_KIND_CAPABILITY = {"vision": "vision", "diffusion": "diffusion", "speech": "speech"}


def _present(value: Any) -> bool:
    """Default-valued arguments (None, False, empty) ask for nothing."""
    if value is None or value is False:
        return False
    if isinstance(value, (str, list, tuple, dict, set, frozenset)):
        return len(value) > 0
    return True


def provided() -> dict[str, str]:
    """Registered capability name -> the plugin that registered it."""
    from mistralrs_core.plugins import get_registry
    return {e.name: e.plugin for e in get_registry().capabilities.values()}


def available(capability: str) -> bool:
    from mistralrs_core.plugins import get_registry
    return capability.lower() in get_registry().capabilities


def require(capability: str, field: str) -> None:
    """Raise ``NotAvailableYet`` naming ``field`` unless an installed plugin provides ``capability``."""
    if available(capability):
        return
    cap = KNOWN.get(capability)
    if cap is None:
        raise NotAvailableYet(field, f"no installed plugin provides {capability!r}")
    raise NotAvailableYet(f"{field} ({cap.what})", f"install {cap.distribution}")


def check_request(req) -> None:
    """Refuse, never ignore, the request fields whose capability is not installed."""
    for field, cap in _BY_REQUEST_FIELD.items():
        if _present(getattr(req, field, None)):
            require(cap.name, field)


def check_runner_args(**args: Any) -> None:
    """``args``: Runner keyword -> value; each one set needs its capability."""
    for name, value in args.items():
        cap = _BY_RUNNER_ARG.get(name)
        if cap is not None and _present(value):
            require(cap.name, f"Runner({name}=...)")


def check_which(which, supported: Iterable[str] = ()) -> None:
    """Refuse the ``Which`` fields neither the loader (``supported``) nor a plugin handles."""
    supported = frozenset(supported)
    for field, cap in _BY_WHICH_FIELD.items():
        if field not in supported and _present(getattr(which, field, None)):
            require(cap.name, f"Which.{type(which).__name__}({field}=...)")


def check_method(method: str) -> None:
    for cap in KNOWN.values():
        if method in cap.methods:
            require(cap.name, method)
            return


def distribution_for_kind(kind: str) -> str | None:
    cap = KNOWN.get(_KIND_CAPABILITY.get(kind, ""))
    return cap.distribution if cap is not None else None
