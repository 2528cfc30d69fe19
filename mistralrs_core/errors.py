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
