"""The real gemma-3-270m for the tests marked gemma: a passage longer than its 512-token window,
and the fixtures the gemma test files share. The GGUF file, slm's model of it and transformers'
model of the same weights are built once per session in conftest.py (gemma_gguf, gemma_lm,
gemma_reference); these name them as the test files use them."""

import os

import pytest

PASSAGE = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "passage.txt"), encoding="utf-8").read()


@pytest.fixture(scope="session")
def gguf_path(gemma_gguf) -> str:
    return gemma_gguf


@pytest.fixture(scope="session")
def ours(gemma_lm):
    return gemma_lm


@pytest.fixture(scope="session")
def reference(gemma_reference):
    return gemma_reference
