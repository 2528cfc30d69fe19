"""OpenAI error objects, and the mapping from the engine's exceptions to HTTP statuses.

The API's ValueErrors start with the offending field (``"max_tokens: must be >= 1"``), so
the field becomes the error's ``param`` and clients can tell what to fix without parsing
prose.
"""
from __future__ import annotations

import logging
import re

from fastapi.responses import JSONResponse

from mistralrs_core.errors import EngineStopped, ModelError, NotAvailableYet, QueueFull, RequestTimedOut

log = logging.getLogger("mistralrs.server")

# A field path as validate.py writes it: `messages[2].content`, `logit_bias['7']`.
_FIELD = re.compile(r"^[A-Za-z_][\w.\-]*(\[[^\]]*\][\w.\-]*)*$")
_REFUSED = re.compile(r"^([a-z_][\w.]*) \(")
# The Runner speaks of `model_id`; over HTTP the field is `model`.
_PARAM_ALIASES = {"model_id": "model"}


RETRY_AFTER_S = "1"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers or self.headers)


def field_of(message: str) -> str | None:
    head, sep, _ = message.partition(":")
    if not sep or not _FIELD.match(head):
        return None
    return _PARAM_ALIASES.get(head, head)


def unknown_model(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")


def from_exception(exc: BaseException) -> APIError:
    """The error object (and status) that ``exc`` raised by the Runner should become."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, NotAvailableYet):
        # 400 rather than 501: OpenAI clients retry every 5xx, and asking again cannot help.
        # Its message starts with the refused field: "grammar (constrained decoding) is not ..."
        m = _REFUSED.match(str(exc))
        return APIError(400, str(exc), param=m.group(1) if m else None, code="not_available")
    if isinstance(exc, ValueError):
        msg = str(exc)
        # "model 'x' is an embedding model; ..." is about the request's model too.
        param = field_of(msg) or ("model" if msg.startswith("model ") else None)
        if "unknown model" in msg and param == "model":
            return APIError(404, msg, param="model", code="model_not_found")
        code = "context_length_exceeded" if "maximum context length" in msg else None
        return APIError(400, msg, param=param, code=code)
    if isinstance(exc, (QueueFull, EngineStopped)):
        # 503 + Retry-After: the client should come back (an unloaded model reloads on demand).
        return APIError(503, str(exc), type="server_error",
                        code="overloaded" if isinstance(exc, QueueFull) else "model_unloaded",
                        headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, RequestTimedOut):
        return APIError(504, str(exc), type="server_error", code="request_timeout")
    if isinstance(exc, ModelError):
        return APIError(500, str(exc), type="server_error", code="model_error")
    log.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="internal_error")
