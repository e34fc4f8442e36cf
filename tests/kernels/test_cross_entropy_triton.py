"""The Triton kernels used for GPU training against PyTorch: the cross-entropy
(slm/kernels/cross_entropy.py) against F.cross_entropy, with and without the head fused in,
SwiGLU/GeGLU (slm/kernels/glu.py) against F.silu/F.gelu, and rotary embedding with the Q/K/V split
(slm/kernels/rope.py) against model.apply_rope; loss and gradients, bf16 and fp32,
ignored targets, several blocks per row; then a whole model's loss and gradients with both
(slm/accel/gpu_train.py's modules) against the reference model's.
Without a GPU the kernels run under Triton's interpreter, in a fresh process (the interpreter must
be chosen before Triton is imported)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CHECK = r"""
import sys, torch, torch.nn.functional as F
import slm.kernels.cross_entropy as ce
device = sys.argv[1]
ce.BLOCK = 256  # several blocks and a ragged tail per row of 1,000
cases = [(sc, dt, scale) for sc in (True, False) for dt in (torch.float32, torch.bfloat16) for scale in (3.0, 80.0)]
for ce.SCALAR, dtype, scale in cases:  # both forward variants (on a GPU the autotuner picks one)
    # scale 80: large logits, where the online maximum must keep exp() finite
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 1000, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, 1000, (37,), generator=g).to(device)
    t[3] = t[10] = -100
    t[5] = 999  # the last column, in the tail block
    ours = ce.cross_entropy(logits, t)
    (ours * 0.5).backward()
    g_ours = logits.grad.clone()
    logits.grad = None
    ref = F.cross_entropy(logits.float(), t)
    (ref * 0.5).backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the gradient is rounded to bf16
    assert g_ours.dtype == dtype
    assert abs(ours.item() - ref.item()) <= 1e-4 * max(1.0, ref.item()), (dtype, scale, ours.item(), ref.item())
    err = (g_ours.float() - logits.grad.float()).abs().max().item()
    assert err <= tol * logits.grad.float().abs().max().item(), (dtype, scale, err)
    assert (g_ours[3] == 0).all() and (g_ours[10] == 0).all()
# every target ignored: loss 0 (F.cross_entropy would give nan) and no gradient
logits = torch.randn(4, 1000, device=device, requires_grad=True)
loss = ce.cross_entropy(logits, torch.full((4,), -100, device=device))
loss.backward()
assert loss.item() == 0.0 and (logits.grad == 0).all()
if device == "cuda":  # one compiled graph with the loss, as Trainer runs it
    w = torch.randn(1000, 64, device=device, requires_grad=True)
    h = torch.randn(37, 64, device=device)
    t = torch.randint(0, 1000, (37,), device=device)
    f = torch.compile(lambda h, t: ce.cross_entropy(h @ w.t(), t), fullgraph=True)
    f(h, t).backward()
    gw = w.grad.clone()
    w.grad = None
    F.cross_entropy(h @ w.t(), t).backward()
    assert torch.allclose(gw, w.grad, atol=1e-5)
print("ok")
"""

CHECK_FUSED = r"""
import sys, torch, torch.nn.functional as F
import slm.kernels.cross_entropy as ce, slm.kernels.glu as glu, slm.kernels.rope as rope
device = sys.argv[1]
ce.BLOCK, glu.BLOCK = 256, 128  # several blocks and a ragged tail per row
for dtype in (torch.float32, torch.bfloat16):
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16: results rounded to bf16

    def close(ours, ref, what):
        assert ours.dtype == dtype, (what, ours.dtype)
        err = (ours.float() - ref.float()).abs().max().item()
        assert err <= tol * ref.float().abs().max().item(), (what, dtype, err)

    g = torch.Generator().manual_seed(0)
    for gelu in (False, True):  # SwiGLU, GeGLU: [gate | up] of width 2 x 300
        h = (torch.randn(3, 5, 600, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_()
        d = torch.randn(3, 5, 300, generator=g).to(device=device, dtype=dtype)
        y = glu.glu(h, gelu)
        y.backward(d)
        grad, h.grad = h.grad, None
        a, b = h.float().chunk(2, -1)
        ref = (F.gelu(a, approximate="tanh") if gelu else F.silu(a)) * b
        ref.backward(d.float())
        close(y, ref, "glu"), close(grad, h.grad, "glu grad")
    # rotary embedding and the Q/K/V split (4 query heads, 2 key/value heads), through attention so
    # that the gradients come back transposed, as in the model; positions need not start at 0
    from slm.model import apply_rope, rope_tables
    B, T, H, K, D = 2, 7, 4, 2, 16
    qkv = torch.randn(B, T, (H + 2 * K) * D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    cos, sin = rope_tables(D, 32, 10000.0, device=device)
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9], list(range(7))], device=device)
    c, s = cos[pos].unsqueeze(1).to(dtype), sin[pos].unsqueeze(1).to(dtype)
    w = torch.randn(B, H, T, D, generator=g).to(device)
    outs = rope.rope_qkv(qkv, c, s, H, K)
    y = F.scaled_dot_product_attention(*[t.transpose(1, 2).float() for t in outs], is_causal=True, enable_gqa=True)
    (y * w).sum().backward()
    grad, qkv.grad = qkv.grad, None
    x = qkv.float().view(B, T, H + 2 * K, D).transpose(1, 2)
    qk = apply_rope(x[:, :H + K], c.float(), s.float())
    ref = qk[:, :H], qk[:, H:], x[:, H + K:]
    for ours, r in zip(outs, ref):
        close(ours.transpose(1, 2), r, "rope")
    F.scaled_dot_product_attention(*ref, is_causal=True, enable_gqa=True).mul(w).sum().backward()
    close(grad, qkv.grad, "rope grad")
    for ce.SCALAR in (True, False):  # the head fused into the loss
        h = torch.randn(2, 19, 64, generator=g).to(device=device, dtype=dtype).requires_grad_()
        w = (torch.randn(1000, 64, generator=g) * 0.3).to(device=device, dtype=dtype).requires_grad_()
        t = torch.randint(0, 1000, (2, 19), generator=g).to(device)
        t[0, 3] = t[1, 10] = -100
        t[1, 5] = 999
        ours = ce.linear_cross_entropy(h, w, t)
        (ours * 0.5).backward()
        gh, gw, h.grad, w.grad = h.grad, w.grad, None, None
        ref = F.cross_entropy((h.float() @ w.float().t()).view(-1, 1000), t.view(-1))
        (ref * 0.5).backward()
        assert abs(ours.item() - ref.item()) <= tol * ref.item(), (dtype, ours.item(), ref.item())
        close(gh, h.grad, "hidden grad"), close(gw, w.grad, "head grad")
        assert (gh[0, 3] == 0).all() and (gh[1, 10] == 0).all()  # ignored targets: no gradient

# A whole model: the loss and every gradient, plain against the Triton SwiGLU, rope and fused head
import slm
from slm.accel import gpu_train, swap
from slm.train.loop import lm_loss
cfg = slm.ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=150, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=64, tie_embeddings=True)
torch.manual_seed(0)
model = slm.Transformer(cfg).to(device)
model.init_weights()
x, y = torch.randint(0, 1000, (2, 2, 32), device=device)
results = []
for triton_parts in (False, True):  # the reference model, then with the Triton MLP and Attention
    if triton_parts:
        swap(model.modules(), gpu_train.classes(model, ("glu", "rope")))
    head_loss = ce.linear_cross_entropy if triton_parts else None
    loss_fn = lambda x, y: lm_loss(model, x, y, fuse_head=True, head_loss=head_loss)
    if device == "cuda" and triton_parts:  # one compiled graph, as Trainer runs it
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    loss = loss_fn(x, y)
    loss.backward()
    results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    model.zero_grad(set_to_none=True)
(plain, g0), (fused, g1) = results
assert abs(plain - fused) <= 1e-4 * plain, (plain, fused)
for n in g0:
    err = (g0[n] - g1[n]).abs().max().item()
    assert err <= 1e-4 * g0[n].abs().max().item() + 1e-7, (n, err)
print("ok")
"""

# torch.compile must keep the whole loss in one graph with the kernels in it, both ways. This runs
# without a GPU: dynamo and AOT autograd trace with fake tensors, and the compilers below only
# record the graphs they are given (running them needs a GPU).
CHECK_TRACE = r"""
import logging, torch, slm
import torch._functorch.config as functorch_config
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
import slm.kernels.cross_entropy as ce
from slm.accel import gpu_train, swap
from slm.train.loop import lm_loss
functorch_config.force_non_lazy_backward_lowering = True  # trace the backward at once, not at its first run
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)  # no GPU to inspect kernels
cfg = slm.ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=150, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=64, tie_embeddings=True)
model = slm.Transformer(cfg)
swap(model.modules(), gpu_train.classes(model, ("glu", "rope")))  # the Triton MLP and Attention
graphs = {}

class Traced(Exception):
    pass

def backend(gm, inputs):
    def record(name):
        def compiler(graph, example_inputs):
            graphs[name] = [getattr(k, "fn", k).__name__ for k in
                            (kernel_side_table.get_kernel(n.kwargs["kernel_idx"]) for n in graph.graph.nodes
                             if "triton_kernel_wrapper" in str(n.target))]
            def run(*args):
                raise Traced
            return run
        return compiler
    return aot_module_simplified(gm, inputs, fw_compiler=record("forward"), bw_compiler=record("backward"))

loss = torch.compile(lambda x, y: lm_loss(model, x, y, head_loss=ce.linear_cross_entropy), fullgraph=True,
                     backend=backend)
try:
    loss(torch.randint(0, 1000, (2, 32)), torch.randint(0, 1000, (2, 32)))
except Traced:
    pass
assert graphs["forward"] == ["_rope_qkv_forward", "_glu_forward"] * 2 + ["_triton_ce_grad"], graphs
assert graphs["backward"] == ["_glu_backward", "_rope_qkv_backward"] * 2, graphs
print("ok")
"""


def _triton_or_skip():
    try:
        import triton  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":  # under CI (which installs it) a missing Triton is a failure
            raise
        pytest.skip("triton is not installed (pip install triton)")


def _run(check: str, interpret: bool = True) -> None:
    _triton_or_skip()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu" and interpret:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", check, device], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_triton_cross_entropy_matches_torch():
    _run(CHECK)


def test_triton_glu_and_fused_head_match_torch():
    _run(CHECK_FUSED)


def test_triton_parts_compile_into_one_graph():
    _run(CHECK_TRACE, interpret=False)  # compiled kernels, not the interpreter's stand-ins


def test_triton_kernels_only_on_gpu(monkeypatch):
    from slm.kernels import triton_launch
    assert not triton_launch.available(torch.device("cpu"), "ce")  # the CPU fuses the head into its own loss instead
    if triton_launch.triton is None:
        return
    cuda, parts = torch.device("cuda"), ("ce", "linear_ce", "glu", "rope")
    monkeypatch.delenv("SLM_TRITON", raising=False)
    monkeypatch.delenv("SLM_NO_TRITON", raising=False)
    assert [triton_launch.available(cuda, p) for p in parts] == [True, False, False, False]
    monkeypatch.setenv("SLM_TRITON", "glu,rope")  # parts not yet on by default, to measure what they give
    assert [triton_launch.available(cuda, p) for p in parts] == [True, False, True, True]
    monkeypatch.setenv("SLM_NO_TRITON", "1")
    assert not any(triton_launch.available(cuda, p) for p in parts)
