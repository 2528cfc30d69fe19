"""Sandboxed Python execution for the agentic loop: the ``execute_python`` tool.

* ``launcher``: the sandbox's own first process (stdlib only, run by path): namespaces,
  privilege drop, rlimits, then the interpreter as PID 1 of a new PID namespace;
* ``sandbox``: one call, from the tool side (per-call directory, timeout, output, files);
* ``files``: what a call wrote -> ``File`` objects (``Runner.find_file``).
"""
