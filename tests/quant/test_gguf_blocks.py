"""A GGUF file's quantized tensors kept in their own blocks (slm.quant.gguf_layers.GGUFLinear) and the
kernels that run them (torch.ops.slm_cpu.linear_gguf / dequantize_gguf), and the fused decoding
helpers (rms_norm_rope, rms_norm_add, gelu_tanh_mul, attn_decode, argmax_rows): each against a
reference written with PyTorch and gguf-py's dequantizer, and the PyTorch fallback against the kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

import slm  # noqa: E402
from slm import kernels  # noqa: E402
from slm.quant.gguf_layers import Q5_0R4, GGUFLinear, q5_0_regroup, q5_0_ungroup, quantize_x_reference  # noqa: E402
from slm.quant.layers import MAX_DIRECT  # noqa: E402

needs_kernels = pytest.mark.skipif(kernels.cpu_ops() is None, reason=f"no CPU kernels: {kernels.kernel_error()}")
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def blocks(n: int, k: int, qtype, seed: int = 0) -> np.ndarray:
    """uint8 [n, row bytes]: Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 quantized from N(0, 1) by gguf-py; Q4_K/Q5_K/Q6_K
    (which gguf-py cannot quantize) random bytes with small positive fp16 super-block scales."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        # a mean per row: Q4_1/Q5_1's minimums then differ from -amax
        return quantize((rng.standard_normal((n, k)) + rng.standard_normal((n, 1))).astype(np.float32), qtype)
    bw, bb = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // bw, bb), dtype=np.uint8)
    d = rng.uniform(1e-3, 1e-2, (n, k // bw, 2)).astype(np.float16).view(np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):
        raw[:, :, 0:4] = d.reshape(n, k // bw, 4)  # d and dmin
    else:
        raw[:, :, 208:210] = d[:, :, :2]
    return raw.reshape(n, -1)


def layer(parts, k: int, bias: bool = False) -> tuple[GGUFLinear, torch.Tensor]:
    """A GGUFLinear over parts [(qtype, rows)], and its weight dequantized by gguf-py."""
    raws = [(int(t), blocks(n, k, t, seed=i)) for i, (t, n) in enumerate(parts)]
    m = GGUFLinear(k, [(t, torch.from_numpy(r)) for t, r in raws], bias=bias)
    if bias:
        m.bias.data.normal_()
    w = torch.from_numpy(np.concatenate([dequantize(r, Q(t)) for t, r in raws]))
    return m, w


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf_py(qtype):
    m, w = layer([(qtype, 24)], 512)
    assert torch.equal(m.dequantize(), w)
    ids = torch.tensor([5, 0, 23, 5])
    assert torch.equal(m.rows(ids), w[ids])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 3, 70])  # 70: above MAX_DIRECT, dequantize + GEMM in fp32
def test_linear_matches_reference(qtype, rows, monkeypatch):
    torch.manual_seed(0)
    m, w = layer([(qtype, 40)], 512)
    x = torch.randn(rows, 512)
    xr = quantize_x_reference(x) if rows <= MAX_DIRECT else x  # the kernel's int8 x, up to MAX_DIRECT rows
    ref = (xr.double() @ w.double().T).float()
    tol = 1e-5 * ref.abs().max().item()
    if kernels.cpu_ops() is not None:
        torch.testing.assert_close(m(x), ref, rtol=0, atol=tol)
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)  # the PyTorch path
    torch.testing.assert_close(m(x), ref, rtol=0, atol=tol)
    torch.testing.assert_close(m.dequantize(), w)


def test_mixed_parts_and_bias(monkeypatch):
    """A fused QKV whose parts have different formats (as gemma-3-270m's Q5_0 Q/K and Q8_0 V)."""
    torch.manual_seed(0)
    m, w = layer([(Q.Q5_0, 24), (Q.Q8_0, 8), (Q.Q6_K, 16), (Q.Q4_K, 8), (Q.Q4_1, 8), (Q.Q5_K, 8)], 256, bias=True)
    assert m.out_features == 72 and m.types == (Q5_0R4, 8, 14, 12, 3, 13)  # Q5_0 regrouped
    x = torch.randn(2, 1, 256)
    ref = (quantize_x_reference(x.view(2, 256)).double() @ w.double().T).float() + m.bias
    tol = 1e-5 * ref.abs().max().item()  # fp32 sums of up to ~400 in another order
    got = m(x)
    assert got.shape == (2, 1, 72)
    torch.testing.assert_close(got.view(2, 72), ref, rtol=0, atol=tol)
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    torch.testing.assert_close(m(x).view(2, 72), ref, rtol=0, atol=tol)


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_random_shapes(qtype):
    """Widths of 1 to 9 blocks (none, some or several whole groups of the unrolled loop) and 1 to 5
    rows of x (the kernel's 1-4 rows at a time, and a remainder), against the reference."""
    rng = np.random.default_rng(int(qtype))
    bw = gguf.GGML_QUANT_SIZES[qtype][0]
    for i in range(6):
        k, n, b = bw * int(rng.integers(1, 10)), int(rng.integers(1, 40)), int(rng.integers(1, 6))
        raw = blocks(n, k, qtype, seed=i)
        m = GGUFLinear(k, [(int(qtype), torch.from_numpy(raw))])
        w = torch.from_numpy(dequantize(raw, qtype))
        x = torch.randn(b, k)
        ref = (quantize_x_reference(x).double() @ w.double().T).float()
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item(), msg=f"k={k} n={n} b={b}")


@pytest.mark.parametrize("k", [32, 224, 640])  # no whole group of 4 blocks; 1 group and 3 blocks left; 5 groups
def test_q5_0_regrouped(k, monkeypatch):
    raw = blocks(8, k, Q.Q5_0)
    assert np.array_equal(q5_0_ungroup(q5_0_regroup(raw)), raw)
    m, w = layer([(Q.Q5_0, 8)], k)
    assert torch.equal(m.dequantize(), w)
    x = torch.randn(3, k)
    ref = quantize_x_reference(x) @ w.T
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-4)
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(m.dequantize(), w, rtol=0, atol=0)


def test_q8_0_minus_128_becomes_minus_127():
    """The integer kernel cannot take -128 (ggml never writes it): such a weight is read as -127 by
    every path, so the kernel and the dequantized weight agree."""
    raw = blocks(4, 64, Q.Q8_0)
    raw.reshape(4, 2, 34)[1, 0, 2 + 5] = 0x80  # row 1, block 0, weight 5
    m = GGUFLinear(64, [(int(Q.Q8_0), torch.from_numpy(raw))])
    w = torch.from_numpy(dequantize(raw, Q.Q8_0))
    d = w[1, 5] / -128
    assert m.dequantize()[1, 5] == d * -127 and torch.equal(m.dequantize()[0], w[0])
    assert raw.reshape(4, 2, 34)[1, 0, 7] == 0x80  # the caller's bytes are left alone
    x = torch.randn(1, 64)
    ref = quantize_x_reference(x).double() @ m.dequantize().double().T
    torch.testing.assert_close(m(x).double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_refuses_wrong_sizes():
    with pytest.raises(ValueError):
        GGUFLinear(640, [(int(Q.Q4_K), torch.zeros(4, 360, dtype=torch.uint8))])  # 640 is not whole 256-blocks
    with pytest.raises(ValueError):
        GGUFLinear(64, [(int(Q.Q8_0), torch.zeros(4, 60, dtype=torch.uint8))])


def test_quantized_x_error_is_small():
    """What the int8 activations cost: the product with x as two int8 rows per block of 32 (x, then
    its residual) is ~16-bit exact, where one int8 row alone (llama.cpp's) is off by ~0.3%."""
    from slm.quant.gguf_layers import _int8_blocks

    torch.manual_seed(0)
    m, w = layer([(Q.Q8_0, 64), (Q.Q4_K, 64)], 512)
    x = torch.randn(1, 512)
    exact = (x.double() @ w.double().T).float()
    one_row = ((_int8_blocks(x)[0] @ w.T - exact).norm() / exact.norm()).item()
    two_rows = ((m(x) - exact).norm() / exact.norm()).item()
    assert 1e-3 < one_row < 0.01 and two_rows < 1e-4, (one_row, two_rows)


# -- loading a GGUF file ----------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0], ids=lambda q: q.name)
def test_load_keeps_the_files_blocks(tmp_path, qtype):
    from support.models import hf_config
    from support.gguf_files import gguf_tensors, spm_vocab, write_gguf
    from transformers import AutoModelForCausalLM

    from slm.quant.layers import Int8Linear, QuantEmbedding

    cfg = hf_config("llama", len(spm_vocab()["token_list"]), num_key_value_heads=2)
    torch.manual_seed(0)
    sd = AutoModelForCausalLM.from_config(cfg).eval().state_dict()
    path = write_gguf(tmp_path / "m.gguf", "llama", cfg, gguf_tensors("llama", cfg, sd), qtype, spm_vocab())
    ref = slm.load(path, quantize="none")  # the file's weights dequantized to fp32
    lm = slm.load(path, quantize="int4")  # int4: the file's 5- and 8-bit blocks are kept, not rounded to 4 bits
    qkv = lm.model.blocks[0].attn.qkv_proj
    assert isinstance(qkv, GGUFLinear) and set(qkv.types) == {int(qtype)}
    assert isinstance(lm.model.lm_head, GGUFLinear)
    # Q/K rows un-permuted as the fp32 tensors are: the dequantized blocks are the reference's weights
    torch.testing.assert_close(qkv.dequantize(), ref.model.blocks[0].attn.qkv_proj.weight, rtol=0, atol=0)
    ids = torch.tensor([lm.tokenizer.encode("Once upon a time, there was a little girl")])
    with torch.no_grad():
        got, want = lm.model(ids), ref.model(ids)
    assert ((got - want).norm() / want.norm()).item() < 0.02  # the int8 activations only
    assert not isinstance(lm.model.embed, QuantEmbedding) or lm.model.embed.tied_to is None
    requant = slm.load(path, quantize="int8", file_blocks=False)
    assert isinstance(requant.model.blocks[0].attn.qkv_proj, Int8Linear)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_1, Q.Q8_0], ids=lambda q: q.name)
def test_default_load_keeps_the_files_blocks(tmp_path, qtype, capsys):
    """With no options a GGUF file runs in its own blocks (llama.cpp's way), its other tensors in
    fp32; quantize="none" or an explicit dtype gives the dequantized model; the stderr line says which."""
    from support.gguf_files import gguf_tensors, spm_vocab, write_gguf
    from support.models import hf_config
    from transformers import AutoModelForCausalLM

    cfg = hf_config("llama", len(spm_vocab()["token_list"]), num_key_value_heads=2)
    torch.manual_seed(0)
    sd = AutoModelForCausalLM.from_config(cfg).eval().state_dict()
    path = write_gguf(tmp_path / "m.gguf", "llama", cfg, gguf_tensors("llama", cfg, sd), qtype, spm_vocab())
    capsys.readouterr()
    lm = slm.load(path)
    err = capsys.readouterr().err
    assert f"slm: m.gguf: file blocks {qtype.name} (15 tensors); fp32 elsewhere" in err
    assert "dequantized from the file's" in err  # the untied embedding: a lookup table, in fp32
    ref = slm.load(path, quantize="none")
    assert f"slm: m.gguf: fp32 (dequantized from the file's {qtype.name} x 16)" in capsys.readouterr().err
    assert type(slm.load(path, dtype="fp32").model.blocks[0].mlp.down_proj) is type(ref.model.blocks[0].mlp.down_proj)
    for name, m in lm.model.named_modules():
        if isinstance(m, torch.nn.Linear) or isinstance(m, GGUFLinear):
            assert isinstance(m, GGUFLinear) and set(m.types) == {int(qtype)}, name
            torch.testing.assert_close(m.dequantize(), ref.model.get_submodule(name).weight, rtol=0, atol=0)
    assert type(lm.model.embed) is torch.nn.Embedding
    assert torch.equal(lm.model.embed.weight, ref.model.embed.weight)
    ids = torch.tensor([lm.tokenizer.encode("Once upon a time, there was a little girl")])
    with torch.no_grad():
        got, want = lm.model(ids), ref.model(ids)
    assert ((got - want).norm() / want.norm()).item() < 0.02  # the int8 activations only
    lm.save(str(tmp_path / "f"))  # the file's blocks are saved dequantized, as the fp32 model would be
    back = slm.load(str(tmp_path / "f"))
    torch.testing.assert_close(back.model.blocks[0].mlp.down_proj.weight, lm.model.blocks[0].mlp.down_proj.dequantize())


# -- fused decoding helpers -------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("rd", [256, 128])
def test_rms_norm_rope(rd):
    from slm.accel import cpu_decode
    from slm.model import RMSNorm, apply_rope, rope_tables
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 256)
    cos, sin = rope_tables(rd, 10, 10000.0)
    p = torch.tensor([[1, 2, 3], [4, 5, 6]])
    c, s = cos[p].unsqueeze(1), sin[p].unsqueeze(1)
    n = cpu_decode.RMSNorm(256, 1e-6, True)
    n.weight.data.normal_()
    reference = RMSNorm(256, 1e-6, True)
    reference.load_state_dict(n.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(n.rope(x, c, s), apply_rope(reference(x), c, s), rtol=0, atol=1e-5)
        r = torch.randn(2, 4, 3, 256)
        torch.testing.assert_close(n.add_to(r, x), r + reference(x), rtol=0, atol=1e-5)


@needs_kernels
def test_gelu_tanh_mul():
    torch.manual_seed(0)
    h = torch.randn(3, 2 * 1000) * 4
    gate, up = h.chunk(2, -1)
    torch.testing.assert_close(kernels.fused_op("gelu_tanh_mul")(h), F.gelu(gate, approximate="tanh") * up,
                               rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("S", [1, 7, 100])
def test_attn_decode(S):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 256)
    K, V = torch.randn(2, 2, 200, 256), torch.randn(2, 2, 200, 256)
    k, v = K[:, :, :S], V[:, :, :S]  # views of a cache, as decoding passes them
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.0625, enable_gqa=True)
    torch.testing.assert_close(kernels.fused_op("attn_decode")(q, k, v, 0.0625), ref, rtol=0, atol=1e-5)


@needs_kernels
def test_argmax_rows():
    op = kernels.fused_op("argmax_rows")
    torch.manual_seed(0)
    for V in (1, 100, 70000, 262144):
        x = torch.randn(2, V)
        assert torch.equal(op(x), x.argmax(-1))
    x = torch.randn(1, 100000)
    x[0, 5000] = x[0, 90000] = 10.0  # ties: the first
    assert op(x).item() == 5000
    x[0, 95000] = x[0, 99999] = 10.0  # later ties, one in the scalar tail
    assert op(x).item() == 5000
    y = torch.full((1, 100003), float("-inf"))
    assert op(y).item() == y.argmax(-1).item() == 0
    y[0, 100001] = 0.0
    assert op(y).item() == 100001
    x[0, 70000] = x[0, 80000] = float("nan")  # NaN wins, as in torch.argmax
    assert op(x).item() == x.argmax(-1).item() == 70000


def test_save_refuses_blocks_but_dequantizes(tmp_path):
    from support.gguf_files import gguf_tensors, spm_vocab, write_gguf
    from support.models import hf_config
    from transformers import AutoModelForCausalLM

    from slm.checkpoint.safetensors_io import CheckpointError

    cfg = hf_config("llama", len(spm_vocab()["token_list"]), num_key_value_heads=2)
    torch.manual_seed(0)
    sd = AutoModelForCausalLM.from_config(cfg).eval().state_dict()
    path = write_gguf(tmp_path / "m.gguf", "llama", cfg, gguf_tensors("llama", cfg, sd), Q.Q8_0, spm_vocab())
    lm = slm.load(path, quantize="int8")
    with pytest.raises(CheckpointError, match="file_blocks=False"):
        lm.save(str(tmp_path / "q"))
    lm.save(str(tmp_path / "f"), dequantize=True)
    back = slm.load(str(tmp_path / "f"))
    torch.testing.assert_close(back.model.blocks[0].mlp.down_proj.weight, lm.model.blocks[0].mlp.down_proj.dequantize())


@needs_kernels
@pytest.mark.parametrize("family", ["gemma3", "llama"])  # qk-norm + full rotary; no norm
def test_attn_step_matches_the_unfused_step(family, monkeypatch):
    """Decoding with the fused attention step (norms, rope, cache write, attention in one call)
    gives the logits and cache of the step-by-step path, sliding windows included."""
    from support.models import hf_config

    from slm.accel import accelerate
    from slm.model.config import ModelConfig
    from slm.model import Transformer

    kw = dict(sliding_window=4, num_key_value_heads=1) if family == "gemma3" else dict(num_key_value_heads=2)
    torch.manual_seed(0)
    model = accelerate(Transformer(ModelConfig.from_hf(hf_config(family, 128, **kw).to_dict())).eval())
    model.init_weights()
    ids = torch.randint(0, 128, (1, 12))

    def decode():
        cache, out = model.new_cache(1, 16), []
        with torch.no_grad():
            model(ids[:, :3], cache=cache)
            for t in range(3, 12):
                out.append(model(ids[:, t:t + 1], cache=cache)[0, -1])
        return torch.stack(out), cache

    monkeypatch.setenv("SLM_NO_DECODER", "1")  # the module path, which calls attn_step
    fused, cf = decode()
    monkeypatch.setitem(kernels._state, "op:attn_step", None)
    plain, cp = decode()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(cf.k + cf.v, cp.k + cp.v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K], ids=lambda q: q.name)
def test_one_int8_row_of_x(qtype, monkeypatch):
    """SLM_GGUF_X_ROWS=1 (the benchmark's llama.cpp-like row): x in one int8 row, kernel and reference."""
    from slm.quant.gguf_layers import _int8_blocks

    monkeypatch.setenv("SLM_GGUF_X_ROWS", "1")
    m, w = layer([(qtype, 24)], 512)
    x = torch.randn(3, 512)
    ref = (_int8_blocks(x)[0].double() @ w.double().T).float()
    torch.testing.assert_close(quantize_x_reference(x), _int8_blocks(x)[0])
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def _avx512() -> bool:
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


FAST = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q6_K]  # the types rows_gguf_f32 dequantizes (Q5_0 regrouped)
VNNI = [Q.Q8_0, Q.Q4_0, Q.Q4_1]  # the types cols16_vnni takes


def _vnni() -> bool:
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    return _avx512() and "avx512_vnni" in flags


@needs_kernels
@pytest.mark.skipif(not _avx512(), reason="the fp32 rows path runs on CPUs with AVX-512")
@pytest.mark.parametrize("qtype", FAST, ids=lambda q: q.name)
def test_several_rows_of_x_take_exact_products_with_avx512(qtype, monkeypatch):
    """8 to 96 rows of x (a server's batched step, a short prompt): each row of weights dequantized
    exactly as dequant_row (bitwise, against the scalar loop and gguf-py) and dotted with the
    unquantized x, so within fp32 rounding of the dequantized weights' products; below 8 rows, and
    with SLM_NO_AVX512=1, the int8 x of the other path. (Up to MAX_DIRECT rows of the VNNI types
    take cols16_vnni where the CPU has VNNI: SLM_NO_VNNI=1 here, the next test for that path.)"""
    torch.manual_seed(0)
    monkeypatch.setenv("SLM_NO_VNNI", "1")
    k = 512
    m, w = layer([(qtype, 44), (Q.Q8_0, 6)], k, bias=True)  # 44 + 6 rows: tiles of 4 and a remainder
    monkeypatch.setenv("SLM_NO_AVX512", "1")
    scalar = m.dequantize()
    monkeypatch.setenv("SLM_NO_AVX512", "0")
    assert torch.equal(m.dequantize(), scalar) and torch.equal(scalar, w)
    for rows in (8, 13, 33, 96):
        x = torch.randn(rows, k)
        exact = (x.double() @ w.double().T).float() + m.bias
        scale = exact.abs().max().item()
        torch.testing.assert_close(m(x), exact, rtol=0, atol=1e-6 * scale, msg=f"{rows} rows")
    for rows, avx512 in ((7, "0"), (8, "1"), (32, "1")):  # the int8 path: x quantized
        monkeypatch.setenv("SLM_NO_AVX512", avx512)
        x = torch.randn(rows, k)
        ref = (quantize_x_reference(x).double() @ w.double().T).float() + m.bias
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item(), msg=f"{rows} rows")


def _amx() -> bool:
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    return _vnni() and "amx_int8" in flags and "amx_tile" in flags


@needs_kernels
@pytest.mark.skipif(not _amx(), reason="cols16_amx runs on CPUs with AMX-INT8")
@pytest.mark.parametrize("qtype", VNNI, ids=lambda q: q.name)
def test_amx_tiles_compute_what_vnni_computes_bit_for_bit(qtype, monkeypatch):
    """9 to MAX_DIRECT rows of x through the AMX tiles (cols16_amx: 16 rows of weights by up to 16
    pairs of x rows a block; Q8_0 through cols16_amx_q8, the weights loaded straight from their
    blocks and the products transposed; a last 8 rows or fewer of x through cols16_vnni; the 12
    rows left of a part and a part that starts off a multiple of 16 through rows_gguf): the same
    integers, scaled and summed in the same order as cols16_vnni, so the same floats bit for bit."""
    assert torch.ops.slm_cpu.cpu_has_amx(), "the CPU lists AMX-INT8, but this process may not use the tiles"
    monkeypatch.setenv("SLM_NO_AMX", "1")
    assert not torch.ops.slm_cpu.cpu_has_amx()
    torch.manual_seed(0)
    k = 576  # 18 blocks: the tiles' two-block pipeline ends on an even block count here, odd below
    m, w = layer([(qtype, 44), (Q.Q8_0, 6), (qtype, 32)], k, bias=True)
    m_odd, _ = layer([(qtype, 48)], 544)
    for rows in (9, 12, 16, 17, 24, 25, 32):
        for layer_, kk in ((m, k), (m_odd, 544)):
            x = torch.randn(rows, kk) * torch.logspace(-2, 2, kk)  # blocks of very different scales
            monkeypatch.setenv("SLM_NO_AMX", "1")
            vnni = layer_(x)
            monkeypatch.setenv("SLM_NO_AMX", "0")
            amx = layer_(x)
            assert torch.equal(amx, vnni), f"{rows} rows, K {kk}: max difference {(amx - vnni).abs().max()}"
    x = torch.randn(16, k)
    ref = (quantize_x_reference(x).double() @ w.double().T).float() + m.bias
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@needs_kernels
@pytest.mark.skipif(not _vnni(), reason="cols16_vnni runs on CPUs with AVX-512 VNNI")
@pytest.mark.parametrize("qtype", VNNI, ids=lambda q: q.name)
def test_vnni_rows_compute_what_the_int8_path_computes(qtype, monkeypatch):
    """4 to MAX_DIRECT rows of x through cols16_vnni (16 rows of weights at a time, the 12 left of
    a part and a part that starts off a multiple of 16 through rows_gguf): x in quantize_x2's pairs,
    the same integers and scales as the one-row path, so within fp32 summation order of it (which
    SLM_GGUF_VNNI_ROWS=1000 takes), and of the int8 reference; above MAX_DIRECT, x as it is."""
    torch.manual_seed(0)
    k = 512
    m, w = layer([(qtype, 44), (Q.Q8_0, 6), (qtype, 32)], k, bias=True)
    for rows in (4, 5, 8, 13, 16, 17, 32):
        x = torch.randn(rows, k)
        monkeypatch.setenv("SLM_GGUF_VNNI_ROWS", "1000")
        monkeypatch.setenv("SLM_GGUF_F32_ROWS", "1000")
        int8_path = m(x)
        monkeypatch.delenv("SLM_GGUF_VNNI_ROWS")
        monkeypatch.delenv("SLM_GGUF_F32_ROWS")
        vnni = m(x)
        ref = (quantize_x_reference(x).double() @ w.double().T).float() + m.bias
        scale = ref.abs().max().item()
        torch.testing.assert_close(vnni, int8_path, rtol=0, atol=1e-6 * scale, msg=f"{rows} rows")
        torch.testing.assert_close(vnni, ref, rtol=0, atol=1e-5 * scale, msg=f"{rows} rows")
    x = torch.randn(MAX_DIRECT + 1, k)
    torch.testing.assert_close(m(x), (x.double() @ w.double().T).float() + m.bias, rtol=0,
                               atol=1e-6 * (x @ w.T).abs().max().item())
