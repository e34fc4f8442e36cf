"""The real GGUF files loaded as slm.load does by default, in their own blocks (gemma-3-270m
Q4_K_M: Q5_0, Q4_K, Q8_0, Q6_K; SmolLM2-135M-Instruct Q4_1: Q4_1, Q8_0), against the same files
dequantized to fp32 (quantize="none"): the perplexity of a passage of MAX_DIRECT tokens (the kernels'
direct path, x in int8 blocks and its residual, as decoding runs) within 0.1%; and of a longer one
(dequantized weights, fp32 GEMM: the prefill path) within 0.01%."""

from __future__ import annotations

import math

import pytest
import torch
from support.gemma import PASSAGE

import slm
from slm.quant.gguf_layers import GGUFLinear
from slm.quant.layers import MAX_DIRECT


def perplexity(lm, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = lm.model(ids)[0, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())


def check(path: str, formats: set[int], capsys) -> None:
    capsys.readouterr()
    lm = slm.load(path)
    assert "file blocks" in capsys.readouterr().err
    ref = slm.load(path, quantize="none")
    assert "fp32 (dequantized from the file's" in capsys.readouterr().err
    kept = [m for m in lm.model.modules() if isinstance(m, GGUFLinear)]
    assert kept and {t if t != 1006 else 6 for m in kept for t in m.types} == formats
    assert not any(isinstance(m, GGUFLinear) for m in ref.model.modules())
    text = lm.tokenizer.encode(PASSAGE)
    assert len(text) > 2 * MAX_DIRECT
    for n, bound in ((MAX_DIRECT, 1e-3), (len(text), 1e-4)):
        ids = torch.tensor([text[:n]])
        got, want = perplexity(lm, ids), perplexity(ref, ids)
        print(f"perplexity of {n} tokens: file blocks {got:.4f}, dequantized {want:.4f} ({got / want - 1:+.4%})")
        assert abs(got / want - 1) < bound


@pytest.mark.gemma
def test_gemma_default_is_the_files_blocks(gemma_gguf, capsys):
    check(gemma_gguf, {6, 8, 12, 14}, capsys)


@pytest.mark.smollm2
def test_smollm2_default_is_the_files_blocks(smollm2_gguf, capsys):
    check(smollm2_gguf, {3, 8}, capsys)
