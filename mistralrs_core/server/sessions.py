"""``/v1/sessions/{id}`` (upstream's routes): GET exports a session, PUT imports one (the
body is what GET returned), DELETE removes it; ``GET /v1/sessions`` lists the ids. The
model is the ``model`` query parameter (default: the default model), as sessions belong
to a model. Everything goes through the Runner's public session methods."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mistralrs_core.server.context import openai_errors, read_json, state
from mistralrs_core.server.errors import APIError

router = APIRouter()


def _model(request: Request) -> str:
    return state(request).resolve_model(request.query_params.get("model"))


@router.get("/v1/sessions")
@openai_errors
async def list_sessions(request: Request):
    st = state(request)
    ids = await st.run(st.runner.list_session_ids, _model(request))
    return JSONResponse({"object": "list", "data": [{"id": i, "object": "session"} for i in ids]})


@router.get("/v1/sessions/{session_id}")
@openai_errors
async def get_session(session_id: str, request: Request):
    st = state(request)
    exported = await st.run(st.runner.export_session, session_id, _model(request))
    if exported is None:
        raise APIError(404, f"session {session_id!r} does not exist", param="session_id", code="session_not_found")
    return Response(exported, media_type="application/json")


@router.put("/v1/sessions/{session_id}")
@openai_errors
async def put_session(session_id: str, request: Request):
    st = state(request)
    body = await read_json(request)
    await st.run(st.runner.import_session, session_id, json.dumps(body), _model(request))
    return JSONResponse({"id": session_id, "object": "session", "imported": True})


@router.delete("/v1/sessions/{session_id}")
@openai_errors
async def delete_session(session_id: str, request: Request):
    st = state(request)
    existed = await st.run(st.runner.delete_session, session_id, _model(request))
    if not existed:
        raise APIError(404, f"session {session_id!r} does not exist", param="session_id", code="session_not_found")
    return JSONResponse({"id": session_id, "object": "session", "deleted": True})
