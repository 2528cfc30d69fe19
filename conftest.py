"""Session-wide test settings, read before any test module imports its dependencies."""
import os

# Triton reads TRITON_INTERPRET when it is first imported, and a test dependency (peft) imports
# it early. CI has no GPU, so the Triton kernel tests run in the interpreter: switch it on
# before anything imports triton (it changes nothing for code that never launches a kernel).
os.environ.setdefault("TRITON_INTERPRET", "1")
