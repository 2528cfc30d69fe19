"""The ``mistralrs`` commands beyond ``serve`` and ``run``, one module each.

Every module has ``NAME`` (the command), ``add_parser(subparsers)`` (which sets
``tool=<module>`` as the parsed arguments' default, so ``cli.main`` dispatches to it) and
``main(args) -> int`` (the exit status). Modules import nothing heavy at import time:
``mistralrs --help`` and shell completion build every parser.
"""
from __future__ import annotations

from mistralrs_core.cli_tools import bench, completion, doctor, from_config, quantize

TOOLS = (from_config, doctor, bench, quantize, completion)
