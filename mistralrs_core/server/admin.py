"""Model management and operations routes: /v1/models*, /health, /metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from mistralrs_core.server.context import ServerState, openai_errors, read_json, state
from mistralrs_core.server.errors import APIError, unknown_model

router = APIRouter()


def _model_card(st: ServerState, model_id: str) -> dict:
    runner = st.runner
    return {"id": model_id, "object": "model", "created": st.created, "owned_by": "local",
            "status": runner.get_model_status(model_id),
            "default": model_id == runner.get_default_model_id()}


def _status(st: ServerState, model_id: str) -> dict:
    return {"model_id": model_id, "status": st.runner.get_model_status(model_id),
            "default": model_id == st.runner.get_default_model_id(),
            "engine": st.runner.engine_stats(model_id),
            "placement": st.runner.model_placement(model_id)}


async def _target(request: Request) -> tuple[ServerState, str]:
    st = state(request)
    body = await read_json(request)
    model_id = body.get("model_id", body.get("model"))
    if not isinstance(model_id, str):
        raise APIError(400, f"model_id: must be a string, got {model_id!r}", param="model_id")
    if model_id == "default":
        model_id = st.resolve_model(None)
    if model_id not in st.runner.list_models():
        raise unknown_model(model_id)
    return st, model_id


@router.get("/v1/models")
@openai_errors
async def list_models(request: Request):
    st = state(request)
    return JSONResponse({"object": "list", "data": [_model_card(st, m) for m in st.runner.list_models()]})


@router.get("/v1/models/{model_id:path}")
@openai_errors
async def get_model(request: Request, model_id: str):
    st = state(request)
    if model_id not in st.runner.list_models():
        raise unknown_model(model_id)
    return JSONResponse(_model_card(st, model_id))


@router.post("/v1/models/unload")
@openai_errors
async def unload(request: Request):
    st, model_id = await _target(request)
    await st.run(st.runner.unload_model, model_id)
    return JSONResponse(_status(st, model_id))


@router.post("/v1/models/reload")
@openai_errors
async def reload(request: Request):
    st, model_id = await _target(request)
    await st.run(st.runner.reload_model, model_id)
    return JSONResponse(_status(st, model_id))


@router.post("/v1/models/status")
@openai_errors
async def status(request: Request):
    st, model_id = await _target(request)
    return JSONResponse(_status(st, model_id))


@router.get("/health")
async def health(request: Request):
    st = state(request)
    return JSONResponse({"status": "ok", "models": dict(st.runner.list_models_with_status())})


@router.get("/metrics")
async def metrics(request: Request):
    st = state(request)
    return PlainTextResponse(st.metrics.render(st.runner), media_type="text/plain; version=0.0.4")


@router.get("/")
async def root(request: Request):
    from mistralrs_core.server.app import route_paths
    return JSONResponse({"name": "mistralrs for Python", "routes": route_paths()})
