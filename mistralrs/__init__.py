"""`mistralrs`: the public facade.  Re-exports only; the code lives in mistralrs_core."""

from mistralrs_core.api import *  # noqa: F401,F403
from mistralrs_core.api import __all__ as _api_all
from mistralrs_core.errors import ModelError, NotAvailableYet
from mistralrs_core.runner import Runner

__all__ = [*_api_all, "Runner", "NotAvailableYet", "ModelError"]
