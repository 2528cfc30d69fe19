"""Plugin manager and the registries the plugins fill.

Plugins are found through the entry-point group ``mistralrs.plugins``. The environment
variable ``MISTRALRS_PLUGINS`` controls autoloading: unset loads every installed plugin,
``none`` (or ``0``) loads none, and a comma-separated list loads only those entry-point
names.

A broken plugin is recorded in ``failed_plugins()``, logged and unregistered (so none of
its hooks answer later), and the rest keep working. Broken means: it fails to import; a
hook implementation has a name no hookspec declares (a misspelling, caught by pluggy's
``check_pending``) or a bad signature; a registration hook raises; or it registers a
name another plugin already holds (the message names both; the earlier plugin keeps the
name). A plugin's registrations are staged and kept all or none.

Registration hooks are called per plugin: each of the plugin's hook implementations
(``pm.hook.<name>.get_hookimpls()``) is called as pluggy would, with the arguments it
declares. Calling ``pm.hook.<name>(register=...)`` once for all plugins would stop at the
first exception and could not tell whose ``register`` call it was.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from importlib.metadata import entry_points
from typing import Any

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
    processor: str | Any | None = None          # "module:attr" of the family's input processor
    pipeline: str | Any | None = None           # "module:Class" when the kind's default does not fit
    config_from_gguf: str | Any | None = None   # "module:func"(meta, vocab_size, tied) -> HF config

    def load(self):
        return resolve_target(self.target)

    def load_processor(self):
        return None if self.processor is None else resolve_target(self.processor)

    def load_pipeline(self):
        return None if self.pipeline is None else resolve_target(self.pipeline)

    def load_config_from_gguf(self):
        return None if self.config_from_gguf is None else resolve_target(self.config_from_gguf)


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
        self.capabilities: dict[str, Entry] = {}
        self.logits_processors: dict[str, Entry] = {}
        self.decode_attention: dict[str, Entry] = {}
        self.dense_kernels: dict[str, Entry] = {}

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


class DuplicateRegistration(ValueError):
    """Two plugins registered the same name in one table."""


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


def _fail(pm: pluggy.PluginManager, name: str, why: str) -> None:
    """Record a broken plugin and take it out, so none of its hooks answer later."""
    _State.failed[name] = why
    _State.loaded.pop(name, None)
    log.warning("mistralrs plugin %r failed: %s", name, why)
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin, name=name)


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, origin: str) -> bool:
    """``pm.register`` plus the checks pluggy defers: a hook implementation pluggy has no
    spec for (a misspelled hook name) fails the plugin that holds it, not the others."""
    try:
        pm.register(plugin, name=name)
    except Exception as exc:   # bad hook signature, a name taken twice
        _State.failed[name] = f"{type(exc).__name__}: {exc}"
        log.warning("mistralrs plugin %r (%s) failed to register: %s", name, origin, exc)
        return False
    _State.loaded[name] = origin
    _check_pending(pm)
    return pm.has_plugin(name)


def _check_pending(pm: pluggy.PluginManager) -> None:
    while True:
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            bad = pm.get_name(exc.plugin) or repr(exc.plugin)
            _fail(pm, bad, f"unknown hook: {exc} (known hooks: "
                           f"{', '.join(n for n in dir(hookspecs) if n.startswith(hookspecs.PROJECT + '_'))})")


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
        dist = getattr(ep, "dist", None)
        _register(pm, plugin, ep.name, getattr(dist, "name", None) or ep.value)


def _arch_entry(name, target, plugin_name, kw) -> ArchitectureEntry:
    known = {"kind", "hf_model_types", "hf_architectures", "gguf_architectures", "aliases",
             "processor", "pipeline", "config_from_gguf"}
    unknown = set(kw) - known
    if unknown:
        raise TypeError(f"register(): unknown keyword(s) {sorted(unknown)} for architecture {name!r}")
    return ArchitectureEntry(
        name=name, target=target, kind=kw.get("kind", "text"),
        hf_model_types=tuple(kw.get("hf_model_types", ())),
        hf_architectures=tuple(kw.get("hf_architectures", ())),
        gguf_architectures=tuple(kw.get("gguf_architectures", ())),
        aliases=tuple(kw.get("aliases", ())), plugin=plugin_name,
        processor=kw.get("processor"), pipeline=kw.get("pipeline"),
        config_from_gguf=kw.get("config_from_gguf"))


def _capability_register(stage: list, plugin_name: str):
    def register(name: str, *, provides: str = ""):
        from mistralrs_core.capabilities import KNOWN
        if not isinstance(name, str) or not name:
            raise TypeError(f"register(): capability name must be a non-empty str, got {name!r}")
        if name.lower() not in KNOWN:
            log.info("mistralrs plugin %r registers capability %r, which the core does not gate",
                     plugin_name, name)
        stage.append(("capabilities", name.lower(), Entry(name=name.lower(), target=None, plugin=plugin_name,
                                                          extra={"provides": provides})))
    return register


def _kernel_extra(table: str, name: str, kw: dict) -> dict:
    """The keywords of a kernel registration (decode attention, dense): ``device_types``."""
    what = _ENTRY_NOUN[table]
    unknown = set(kw) - {"device_types"}
    if unknown:
        raise TypeError(f"register(): unknown keyword(s) {sorted(unknown)} for {what} {name!r}")
    types = kw.get("device_types", ())
    if isinstance(types, str) or not all(isinstance(t, str) for t in types):
        raise TypeError(f"register(): device_types of {what} {name!r} must be a sequence "
                        f"of device type names like ('cuda',), got {types!r}")
    return {"device_types": tuple(types)}


#: Settings of a kernel seam's environment variable that ask for the torch path only.
KERNELS_OFF = ("torch", "off", "0", "none", "false", "no")


def select_kernels(table: str, env: str, device_type: str) -> tuple:
    """The registered kernels of ``table`` (``decode_attention``, ``dense_kernels``) that the
    setting of ``env`` picks, loaded: unset or ``auto``, those registered for
    ``device_type`` in registration order; ``torch`` (``off``, ...), none; a kernel's name,
    that kernel on any device. An unknown name is a ``ValueError`` naming the variable."""
    mode = os.environ.get(env, "").strip()
    if mode.lower() in KERNELS_OFF:
        return ()
    entries = getattr(get_registry(), table)
    if mode.lower() in ("", "auto"):
        return tuple(e.load() for e in entries.values() if device_type in e.extra.get("device_types", ()))
    entry = entries.get(mode.lower())
    if entry is None:
        raise ValueError(f"{env}={mode!r} names no registered {_ENTRY_NOUN[table]}; use 'auto', 'torch' "
                         f"or one of: {', '.join(sorted(entries)) or 'none registered'}")
    return (entry.load(),)


def _table_register(stage: list, table: str, plugin_name: str):
    def register(name, target, **kw):
        if not isinstance(name, str) or not name:
            raise TypeError(f"register(): name must be a non-empty str, got {name!r}")
        if table == "architectures":
            entry = _arch_entry(name, target, plugin_name, kw)
            # Families are keyed by kind too: the text and the vision "Gemma3" coexist.
            key = f"{entry.kind}:{name.lower()}"
        else:
            if table in ("decode_attention", "dense_kernels"):
                kw = _kernel_extra(table, name, kw)
            entry, key = Entry(name=name, target=target, plugin=plugin_name, extra=kw), name.lower()
        stage.append((table, key, entry))
    return register


_HOOKS = (
    ("mistralrs_register_architectures", "architectures"),
    ("mistralrs_register_loaders", "loaders"),
    ("mistralrs_register_quantizers", "quantizers"),
    ("mistralrs_register_samplers", "samplers"),
    ("mistralrs_register_tool_providers", "tool_providers"),
    ("mistralrs_register_capabilities", "capabilities"),
    ("mistralrs_register_logits_processors", "logits_processors"),
    ("mistralrs_register_decode_attention", "decode_attention"),
    ("mistralrs_register_dense_kernels", "dense_kernels"),
)


_ENTRY_NOUN = {"capabilities": "capability", "decode_attention": "decode-attention kernel",
               "dense_kernels": "dense kernel"}


def _plugin_registrations(pm: pluggy.PluginManager, name: str) -> list:
    """Every registration one plugin makes. Each of the plugin's hook implementations is
    called as pluggy calls it (its declared arguments, by name), one plugin at a time, so
    an error (or a duplicate) is attributed to this plugin alone."""
    stage: list = []
    for hook_name, table in _HOOKS:
        register = (_capability_register(stage, name) if table == "capabilities"
                    else _table_register(stage, table, name))
        kwargs = {"register": register}
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name != name:
                continue
            try:
                impl.function(*(kwargs[a] for a in impl.argnames))
            except Exception as exc:
                raise RuntimeError(f"{hook_name}: {type(exc).__name__}: {exc}") from exc
    return stage


def _fill_registry(pm: pluggy.PluginManager) -> Registry:
    reg = Registry()
    # Plugins in registration order (core, entry points, in-process): the first to claim a
    # name keeps it; a later plugin that claims it again fails as a whole, so none of its
    # entries sit half-registered next to the first plugin's.
    for name, plugin in list(pm.list_name_plugin()):
        if plugin is None:
            continue
        try:
            stage = _plugin_registrations(pm, name)
            seen: dict[tuple, str] = {}
            for table, key, entry in stage:
                current = getattr(reg, table).get(key)
                what = _ENTRY_NOUN.get(table) or table[:-1].replace("_", " ")
                if current is not None:
                    raise DuplicateRegistration(
                        f"{what} {entry.name!r} is registered by both {current.plugin!r} and {name!r}")
                if (table, key) in seen:
                    raise DuplicateRegistration(f"{what} {entry.name!r} is registered twice by {name!r}")
                seen[(table, key)] = name
        except Exception as exc:
            _fail(pm, name, str(exc))
            continue
        for table, key, entry in stage:
            getattr(reg, table)[key] = entry
    return reg
def get_plugin_manager() -> pluggy.PluginManager:
    with _State.lock:
        if _State.pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            from mistralrs_core import defaults
            _register(pm, defaults, "core", "mistralrs-core")
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
            _register(pm, plugin, name, getattr(plugin, "__name__", type(plugin).__name__))
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


def make_sampler(name: str = "default"):
    """A new instance of the registered sampler ``name`` (the engine's ``"default"``)."""
    entry = get_registry().samplers.get(name.lower())
    if entry is None:
        raise ValueError(f"sampler {name!r} is not registered; registered: "
                         f"{', '.join(sorted(get_registry().samplers)) or 'none'}")
    return entry.load()()


def logits_processors_for(request, tokenizer) -> list:
    """The processors every registered factory makes for ``request`` (None: not for it),
    in registration order. A processor is ``(output_ids, logits[vocab]) -> logits``."""
    out = []
    for entry in get_registry().logits_processors.values():
        proc = entry.load()(request, tokenizer)
        if proc is not None:
            if not callable(proc):
                raise TypeError(f"logits processor factory {entry.name!r} ({entry.plugin}) returned "
                                f"{type(proc).__name__}, not a callable")
            out.append(proc)
    return out


def describe() -> str:
    """A human-readable list of what is installed (``python -m mistralrs_core.plugins``)."""
    from mistralrs_core.capabilities import KNOWN
    reg = get_registry()
    lines = ["plugins:"]
    lines += [f"  {n} ({d})" for n, d in installed_plugins().items()]
    for n, why in failed_plugins().items():
        lines.append(f"  {n} FAILED: {why}")
    for title, table in (("architectures", reg.architectures), ("loaders", reg.loaders),
                         ("quantizers", reg.quantizers), ("samplers", reg.samplers),
                         ("tool providers", reg.tool_providers),
                         ("logits processors", reg.logits_processors),
                         ("decode-attention kernels", reg.decode_attention),
                         ("dense kernels", reg.dense_kernels)):
        lines.append(f"{title}:")
        for e in table.values():
            kind = f" [{e.kind}]" if isinstance(e, ArchitectureEntry) else ""
            lines.append(f"  {e.name}{kind} <- {e.plugin}")
    lines.append("capabilities:")
    for name in sorted(set(KNOWN) | set(reg.capabilities)):
        e = reg.capabilities.get(name)
        if e is not None:
            lines.append(f"  {name}: provided by {e.plugin}")
        else:
            lines.append(f"  {name}: not installed (install {KNOWN[name].distribution})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
