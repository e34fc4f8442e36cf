"""llama.cpp (llama-cpp-python) for the tests that compare with it: a skip when it is missing, a
failure under CI."""

from __future__ import annotations

import os

import pytest


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("llama-cpp-python is required under CI (make llamacpp)")
        pytest.skip("llama-cpp-python not installed (make llamacpp)")
    return llama_cpp
