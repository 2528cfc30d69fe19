"""Where a model being loaded goes: the seam between the Runner's load options and the
one weight-loading path.

The Runner sets the placement request for the duration of a load (``loading``: its
``num_device_layers``, the ``Which``'s ``auto_map_params`` and topology devices). Every
``CausalLM.load_weights`` calls ``prepare_for_load`` before the first weight streams in:
under tensor parallelism the meta-device model is sharded for this rank, and a device
map assigns each layer's modules their device. ``finish_model`` (from
``make_text_pipeline``, once the model is loaded) installs the device hops.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Mapping

import attrs
import torch

from mistralrs_core.distributed import device_map as dm
from mistralrs_core.distributed.state import current as current_tp

log = logging.getLogger("mistralrs")


@attrs.define
class PlacementRequest:
    num_device_layers: list[str] | None = None
    auto_map_params: object = None
    topology: str | Mapping | None = None   # topology file (read when the model is built) or parsed
    device: str | None = None               # the load's device option


_REQUEST: contextvars.ContextVar[PlacementRequest | None] = contextvars.ContextVar("mistralrs_placement",
                                                                                   default=None)


@contextlib.contextmanager
def loading(request: PlacementRequest | None):
    """Apply ``request`` to the models loaded inside the block (this thread only)."""
    token = _REQUEST.set(request)
    try:
        yield
    finally:
        _REQUEST.reset(token)


def request_from(which, opts) -> PlacementRequest | None:
    """The placement asked for by a Runner's load options and a ``Which``."""
    ndl = getattr(opts, "num_device_layers", None)
    auto = getattr(which, "auto_map_params", None)
    # Only the path here: the loader first checks that something serves ``topology`` at all.
    topo = getattr(which, "topology", None)
    if not ndl and auto is None and not topo:
        return None
    if ndl and auto is not None:
        raise ValueError("num_device_layers / auto_map_params: give one way of mapping devices, not both")
    return PlacementRequest(list(ndl) if ndl else None, auto, topo, getattr(opts, "device", None))


def _is_yaml_text(value) -> bool:
    """``topology`` may be the YAML itself rather than a file (the quantizer's rule too):
    not an existing file, and multi-line or a ``key:`` without a file suffix."""
    from pathlib import Path
    if not isinstance(value, str) or Path(value).expanduser().is_file():
        return False
    return "\n" in value or (":" in value and not Path(value).suffix)


def load_topology_devices(path) -> Mapping | None:
    """The parsed topology file (or YAML text) if any entry has a ``device`` key (else
    None, and the file is left to the quantizer). Parsing is YAML (safe loader)."""
    import yaml
    text = _is_yaml_text(path)
    where = "(YAML text)" if text else path
    try:
        if text:
            data = yaml.safe_load(path)
        else:
            with open(path) as f:
                data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"topology: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"topology: {where} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"topology: {where} must map layer ranges to settings")
    if not any(isinstance(v, Mapping) and v.get("device") is not None for v in data.values()):
        return None
    return data


def _base_device(req: PlacementRequest | None, load_device) -> torch.device:
    from mistralrs_core.loading.options import pick_device
    return torch.device(load_device) if load_device is not None else pick_device(req.device if req else None)


def resolve_device_map(model, req: PlacementRequest, load_device=None) -> dm.DeviceMap | None:
    base = _base_device(req, load_device)
    n = len(dm.decoder_layers(model))
    if req.num_device_layers:
        return dm.parse_num_device_layers(req.num_device_layers, n, base)
    topo = load_topology_devices(req.topology) if isinstance(req.topology, (str, bytes)) or \
        hasattr(req.topology, "__fspath__") else req.topology
    if topo:
        return dm.device_map_from_topology(topo, n, base)
    if req.auto_map_params is not None:
        if base.type != "cuda":
            # One host: nothing to spread over (upstream maps only accelerators).
            return None
        return dm.auto_map_for_model(model, req.auto_map_params, base)
    return None


def prepare_for_load(model, device=None) -> None:
    """Shard (tensor parallelism) and place (device map) ``model`` before its weights load."""
    if model.__dict__.get("_placement_done"):
        return
    model.__dict__["_placement_done"] = True
    tp = current_tp()
    req = _REQUEST.get()
    if tp is not None:
        if req is not None and (req.num_device_layers or (req.topology and resolve_device_map(model, req))):
            raise ValueError("num_device_layers / topology devices: device mapping and tensor parallelism "
                             "cannot be combined; every rank holds all layers of its shard")
        from mistralrs_core.distributed.tp import shard_model
        shard_model(model, tp)
        return
    if req is None:
        return
    dmap = resolve_device_map(model, req, device)
    if dmap is not None:
        dm.place_for_load(model, dmap)


def finish_model(model) -> None:
    """After loading (``make_text_pipeline``): device hops; a tensor-parallel model keeps
    the plain layer stack (a fused single-device step would skip the collectives)."""
    dmap = getattr(model, "device_map", None)
    if dmap is not None:
        dm.install_hops(model, dmap)
    if getattr(model, "tensor_parallel", None) is not None:
        model.fast_forward = None


def placement_status(model) -> dict | None:
    """What the server's model status reports about where the model lives."""
    out = {}
    dmap = getattr(model, "device_map", None)
    if dmap is not None:
        out["device_map"] = {"source": dmap.source, "layers": dmap.summary(), "base": str(dmap.base)}
    tp = getattr(model, "tp_summary", None)
    if tp is not None:
        out["tensor_parallel"] = {k: tp[k] for k in ("world", "attention", "mlp", "moe", "vocab", "replicated")}
    return out or None
