"""`mistralrs`: the public facade.  Re-exports only; the code lives in mistralrs_core."""

from mistralrs_core.api import *  # noqa: F401,F403
from mistralrs_core.api import __all__ as _api_all

# TODO(lead): enable once mistralrs_core/runner.py lands.
# from mistralrs_core.runner import Runner  # noqa: E402

__all__ = list(_api_all)  # + ["Runner"] with the line above
