"""Exceptions the public API raises beyond ValueError / FileNotFoundError."""


class NotAvailableYet(NotImplementedError):
    """An argument names a capability this installation does not provide (yet)."""

    def __init__(self, what: str, hint: str = ""):
        msg = f"{what} is not available yet in mistralrs for Python"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ModelError(RuntimeError):
    """The engine failed while serving a request (the engine itself keeps running)."""


class QueueFull(ModelError):
    """Admission control: the model's queue is at its limit (``max_queue``); retry later."""


class EngineStopped(ModelError):
    """The model was unloaded or the server is stopping while the request was in flight."""


class RequestTimedOut(ModelError):
    """The request ran past the ``request_timeout`` option."""


def engine_error(message: str, kind: str | None) -> ModelError:
    """The exception for an engine ``("error", message, kind)`` event."""
    return {"timeout": RequestTimedOut, "stopped": EngineStopped}.get(kind, ModelError)(message)


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


class WrongModelKind(ValueError):
    """A call went to a model of a kind that cannot serve it (chat to an embedding model,
    ``generate_image`` to a text model ...)."""

    def __init__(self, model_id: str, kind: str, needed: tuple[str, ...], call: str):
        self.model_id, self.kind, self.needed, self.call = model_id, kind, needed, call
        wanted = " or ".join(_a(k) for k in needed)
        super().__init__(f"model_id: model {model_id!r} is not {wanted} model (it is {_a(kind)} model); "
                         f"{call} needs one")
