"""The Triton cross-entropy used for GPU training (slm/kernels/cross_entropy.py) against
F.cross_entropy: loss and gradient, bf16 and fp32, ignored targets, several blocks per row.
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


def _triton_or_skip():
    try:
        import triton  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":  # under CI (which installs it) a missing Triton is a failure
            raise
        pytest.skip("triton is not installed (pip install triton)")


def test_triton_cross_entropy_matches_torch():
    _triton_or_skip()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", CHECK, device], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_triton_cross_entropy_only_on_gpu():
    from slm.kernels import cross_entropy as ce
    assert not ce.available(torch.device("cpu"))  # the CPU fuses the head into its own loss instead
