"""Plugin manager and the registries the plugins fill.

Plugins are found through the entry-point group ``mistralrs.plugins``. The environment
variable ``MISTRALRS_PLUGINS`` controls autoloading: unset loads every installed plugin,
``none`` (or ``0``) loads none, and a comma-separated list loads only those entry-point
names. A plugin that fails to import is recorded in ``failed_plugins()`` and logged; the
rest keep working.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from importlib.metadata import entry_points
from typing import Any, Callable

import attrs
import pluggy

from mistralrs_core import hookspecs

log = logging.getLogger("mistralrs")

ENTRY_POINT_GROUP = "mistralrs.plugins"
ENV_ALLOWLIST = "MISTRALRS_PLUGINS"


def resolve_target(target: str | Any) -> Any:
    """Import a ``"module:attr"`` string; objects pass through unchanged."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


@attrs.define
class ArchitectureEntry:
    name: str
    target: str | Any
    kind: str
    hf_model_types: tuple[str, ...] = ()
    hf_architectures: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    plugin: str = ""
    pipeline: str | Any = None

    def load(self):
        return resolve_target(self.target)


@attrs.define
class Entry:
    name: str
    target: str | Any
    plugin: str = ""
    extra: dict = attrs.field(factory=dict)

    def load(self):
        return resolve_target(self.target)


class Registry:
    """Tables filled by the registration hooks; names are case-insensitive."""

    def __init__(self):
        self.architectures: dict[str, ArchitectureEntry] = {}
        self.loaders: dict[str, Entry] = {}
        self.quantizers: dict[str, Entry] = {}
        self.samplers: dict[str, Entry] = {}
        self.tool_providers: dict[str, Entry] = {}

    def architecture(self, name: str, kind: str | None = None) -> ArchitectureEntry | None:
        key = name.lower()
        for entry in self.architectures.values():
            if kind is not None and entry.kind != kind:
                continue
            if entry.name.lower() == key or key in (a.lower() for a in entry.aliases):
                return entry
        return None

    def architecture_for_hf(self, config: dict, kind: str | None = None) -> ArchitectureEntry | None:
        archs = [a for a in (config.get("architectures") or [])]
        model_type = config.get("model_type")
        candidates = [e for e in self.architectures.values() if kind is None or e.kind == kind]
        for entry in candidates:
            if any(a in entry.hf_architectures for a in archs):
                return entry
        for entry in candidates:
            if model_type and model_type in entry.hf_model_types:
                return entry
        return None

    def architecture_for_gguf(self, gguf_arch: str, kind: str | None = None) -> ArchitectureEntry | None:
        for entry in self.architectures.values():
            if (kind is None or entry.kind == kind) and gguf_arch in entry.gguf_architectures:
                return entry
        return None

    def names(self, kind: str | None = None) -> list[str]:
        return sorted(e.name for e in self.architectures.values() if kind is None or e.kind == kind)


class _State:
    lock = threading.RLock()
    pm: pluggy.PluginManager | None = None
    registry: Registry | None = None
    failed: dict[str, str] = {}
    loaded: dict[str, str] = {}


def _allowlist() -> set[str] | None:
    raw = os.environ.get(ENV_ALLOWLIST)
    if raw is None or raw.strip() == "" or raw.strip() == "*":
        return None
    if raw.strip().lower() in ("none", "0", "off"):
        return set()
    return {p.strip() for p in raw.split(",") if p.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow = _allowlist()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if allow is not None and ep.name not in allow:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            msg = f"{type(exc).__name__}: {exc}"
            _State.failed[ep.name] = msg
            log.warning("mistralrs plugin %r (%s) failed to load: %s", ep.name, ep.value, msg)
            continue
        pm.register(plugin, name=ep.name)
        dist = getattr(ep, "dist", None)
        _State.loaded[ep.name] = getattr(dist, "name", None) or ep.value


def _fill_registry(pm: pluggy.PluginManager) -> Registry:
    reg = Registry()

    def registrar(table: dict, plugin_name: str, factory: Callable):
        def register(name, target, **kw):
            entry = factory(name, target, plugin_name, kw)
            # Families are keyed by kind too: the text and the vision "Gemma3" coexist.
            key = f"{entry.kind}:{name.lower()}" if isinstance(entry, ArchitectureEntry) else name.lower()
            table[key] = entry
        return register

    def arch_factory(name, target, plugin_name, kw):
        return ArchitectureEntry(
            name=name, target=target, kind=kw.get("kind", "text"),
            hf_model_types=tuple(kw.get("hf_model_types", ())),
            hf_architectures=tuple(kw.get("hf_architectures", ())),
            gguf_architectures=tuple(kw.get("gguf_architectures", ())),
            aliases=tuple(kw.get("aliases", ())), plugin=plugin_name, pipeline=kw.get("pipeline"))

    def entry_factory(name, target, plugin_name, kw):
        return Entry(name=name, target=target, plugin=plugin_name, extra=kw)

    hooks = [
        ("mistralrs_register_architectures", reg.architectures, arch_factory),
        ("mistralrs_register_loaders", reg.loaders, entry_factory),
        ("mistralrs_register_quantizers", reg.quantizers, entry_factory),
        ("mistralrs_register_samplers", reg.samplers, entry_factory),
        ("mistralrs_register_tool_providers", reg.tool_providers, entry_factory),
    ]
    # Call each plugin separately so a registration error names its plugin and
    # leaves the others' entries in place.
    for plugin_name, plugin in pm.list_name_plugin():
        for hook_name, table, factory in hooks:
            impl = getattr(plugin, hook_name, None)
            if impl is None:
                continue
            try:
                impl(register=registrar(table, plugin_name, factory))
            except Exception as exc:
                _State.failed[plugin_name] = f"{hook_name}: {type(exc).__name__}: {exc}"
                log.warning("mistralrs plugin %r failed in %s: %s", plugin_name, hook_name, exc)
    return reg


def get_plugin_manager() -> pluggy.PluginManager:
    with _State.lock:
        if _State.pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            from mistralrs_core import defaults
            pm.register(defaults, name="core")
            _State.loaded["core"] = "mistralrs-core"
            _load_entry_points(pm)
            _State.pm = pm
        return _State.pm


def get_registry() -> Registry:
    with _State.lock:
        if _State.registry is None:
            _State.registry = _fill_registry(get_plugin_manager())
        return _State.registry


def register_plugin(plugin: Any, name: str) -> None:
    """Register an in-process plugin object (tests, applications) and refresh the tables."""
    with _State.lock:
        pm = get_plugin_manager()
        if not pm.has_plugin(name):
            pm.register(plugin, name=name)
            _State.loaded[name] = getattr(plugin, "__name__", repr(plugin))
        _State.registry = None


def reset() -> None:
    """Forget every plugin; the next call rediscovers them (used by tests)."""
    with _State.lock:
        _State.pm = None
        _State.registry = None
        _State.failed = {}
        _State.loaded = {}


def installed_plugins() -> dict[str, str]:
    get_registry()
    return dict(_State.loaded)


def failed_plugins() -> dict[str, str]:
    get_registry()
    return dict(_State.failed)


def describe() -> str:
    """A human-readable list of what is installed (``python -m mistralrs_core.plugins``)."""
    reg = get_registry()
    lines = ["plugins:"]
    lines += [f"  {n} ({d})" for n, d in installed_plugins().items()]
    for n, why in failed_plugins().items():
        lines.append(f"  {n} FAILED: {why}")
    for title, table in (("architectures", reg.architectures), ("loaders", reg.loaders),
                         ("quantizers", reg.quantizers), ("samplers", reg.samplers),
                         ("tool providers", reg.tool_providers)):
        lines.append(f"{title}:")
        for e in table.values():
            kind = f" [{e.kind}]" if isinstance(e, ArchitectureEntry) else ""
            lines.append(f"  {e.name}{kind} <- {e.plugin}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
