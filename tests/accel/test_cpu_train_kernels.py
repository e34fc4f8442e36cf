"""The CPU training step's C++ kernels (accel/cpu_train.py, kernels/cpu/train.cpp) against PyTorch's ops: values and
gradients of the GLU, of the rotation with the Q/K/V split and of causal attention, then a whole
model's loss and every parameter gradient through train/loop.py's loss_function, with the kernels
and in the reference model."""

import pytest
import torch
import torch.nn.functional as F

import slm
from slm import kernels
from slm.accel import cpu_train
from slm.model import apply_rope, rope_tables

pytestmark = pytest.mark.skipif(kernels.cpu_ops() is None, reason=f"no CPU kernels: {kernels.kernel_error()}")


@pytest.mark.parametrize("gelu", [False, True])
def test_glu_matches_torch(gelu):
    torch.manual_seed(0)
    h = (torch.randn(2, 5, 2 * 21) * 3).requires_grad_()  # 21: a tail after groups of 8
    dy = torch.randn(2, 5, 21)
    ours = cpu_train.glu(h, gelu)
    (g_ours,) = torch.autograd.grad(ours, h, dy)
    gate, up = h.chunk(2, -1)
    ref = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    (g_ref,) = torch.autograd.grad(ref, h, dy)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(g_ours, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("per_row", [False, True])
def test_rope_qkv_matches_apply_rope(per_row):
    """Grouped-query heads, positions not starting at 0 (per sequence: packed fine-tuning), and
    gradients arriving transposed, as attention's backward leaves them."""
    torch.manual_seed(0)
    B, T, H, KV, D = 3, 7, 4, 2, 12  # D / 2 = 6: the scalar tail of each half
    cos, sin = rope_tables(D, 16, 10000.0)
    pos = torch.stack([torch.arange(T) + 2 * i + 1 for i in range(B)]) if per_row else torch.arange(T)[None] + 3
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    qkv = torch.randn(B, T, (H + 2 * KV) * D, requires_grad=True)
    ours = cpu_train.rope_qkv(qkv, c, s, H, KV)
    x = qkv.view(B, T, H + 2 * KV, D)
    ref = (apply_rope(x[:, :, :H].transpose(1, 2), c, s).transpose(1, 2),
           apply_rope(x[:, :, H:H + KV].transpose(1, 2), c, s).transpose(1, 2), x[:, :, H + KV:])
    dys = [torch.randn(o.shape).transpose(1, 2).contiguous().transpose(1, 2) for o in ours]
    (g_ours,) = torch.autograd.grad(ours, qkv, dys)
    (g_ref,) = torch.autograd.grad(ref, qkv, dys)
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and torch.allclose(o, r, atol=1e-6)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


@pytest.mark.parametrize("B, T, H, KV, D", [(2, 130, 4, 2, 20), (1, 5, 2, 1, 8), (3, 64, 3, 3, 48)])
def test_attention_matches_sdpa(B, T, H, KV, D):
    """Grouped-query heads; T = 130: two full blocks of 64 query rows and a ragged third, 5: rows
    shorter than a vector of 8; D = 20: a tail after groups of 8. Q, K and V are strided views of
    one qkv tensor, as the model passes them. The reference is SDPA in fp64: at these peaked
    softmaxes fp32 SDPA itself is ~2e-5 off it."""
    torch.manual_seed(0)
    qkv = (torch.randn(B, T, (H + 2 * KV) * D) * 2).requires_grad_()
    dy = torch.randn(B, T, H, D)

    def split(t):
        x = t.view(B, T, H + 2 * KV, D)
        return x[:, :, :H], x[:, :, H:H + KV], x[:, :, H + KV:]

    ours = cpu_train.attention(*split(qkv), 0.3)
    assert "_Attention" in type(ours.grad_fn).__name__  # the kernel, not the fallback
    (g_ours,) = torch.autograd.grad(ours, qkv, dy)
    q, k, v = (t.transpose(1, 2) for t in split(qkv.double()))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=H != KV).transpose(1, 2)
    (g_ref,) = torch.autograd.grad(ref, qkv, dy.double())
    assert ours.shape == ref.shape and torch.allclose(ours.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.allclose(g_ours, g_ref.float(), atol=1e-4, rtol=1e-4)
    fallback = cpu_train.attention(*split(qkv.double()), 0.3)  # not fp32: SDPA, in the same layout
    assert "_Attention" not in type(fallback.grad_fn).__name__ and torch.allclose(fallback, ref)


def _loss_and_grads(model, x, y, on: bool):
    from slm.accel import unaccelerate
    from slm.train.loop import loss_function
    loss_fn = loss_function(model, model, torch.device("cpu"))  # swaps in cpu_train's modules
    # kernels the modules call: one in each MLP (glu), two in each attention (rope_qkv, attention)
    used = sum(isinstance(m, cpu_train.MLP) + 2 * isinstance(m, cpu_train.Attention) for m in model.modules())
    if not on:  # the reference model (the loss keeps its fused head)
        unaccelerate(model)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(x, y)
    loss.backward()
    return used, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_loss_and_gradients_with_and_without_kernels():
    torch.manual_seed(0)
    cfg = slm.get_config("slm-1m")
    model = slm.Transformer(cfg)
    model.init_weights()
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    y = torch.randint(0, cfg.vocab_size, (2, 24))
    used, loss_k, grads_k = _loss_and_grads(model, x, y, on=True)
    assert used == 3 * cfg.num_layers  # every MLP took one kernel and every attention two
    _, loss_t, grads_t = _loss_and_grads(model, x, y, on=False)
    assert torch.allclose(loss_k, loss_t, atol=1e-6)
    for n, g in grads_t.items():
        assert torch.allclose(grads_k[n], g, atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("plus_one", [False, True])
def test_rms_norm_matches_torch(plus_one):
    from slm.model import RMSNorm
    torch.manual_seed(0)
    norm = cpu_train.RMSNorm(20, 1e-5, plus_one)  # 20: a tail after groups of 8
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 20) * 2).requires_grad_()
    dy = torch.randn(3, 5, 20)
    ours = norm(x)  # grad enabled on the CPU in fp32: the C++ kernel
    g_ours = torch.autograd.grad(ours, (x, norm.weight), dy)
    ref = RMSNorm.forward(norm, x)  # the reference module's forward, same weights
    g_ref = torch.autograd.grad(ref, (x, norm.weight), dy)
    assert "_RMSNorm" in type(ours.grad_fn).__name__ or "_RMSNorm" in str(ours.grad_fn.next_functions)
    assert torch.allclose(ours, ref, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def _denormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def test_training_kernels_write_no_denormals_and_leave_the_float_mode_alone():
    """A trained model's softmaxes are peaked: many probabilities fall below float's smallest normal,
    and every product that makes or reads such a denormal takes a slow path (training slowed 2.6x as
    it learnt). The kernels flush them to zero, the loss's gradient and attention's output too, and
    restore the thread's flags: a denormal made after the call is still a denormal."""
    torch.manual_seed(0)
    logits = torch.randn(64, 512) * 40  # spread of ~200 nats: e^-100 and below is < 1.2e-38
    reference = (torch.softmax(logits.double(), -1) - F.one_hot(torch.zeros(64, dtype=torch.long), 512)) / 64
    assert _denormals(reference.float()) > 0  # what PyTorch's fp32 softmax would hand the head's products
    g = logits.clone()
    kernels.fused_op("softmax_xent_")(g, torch.zeros(64, dtype=torch.long), -100, 1 / 64)
    assert _denormals(g) == 0 and torch.allclose(g.double(), reference, atol=1e-7)
    qkv = torch.randn(1, 96, 3 * 2 * 16) * 30  # peaked attention
    q, k, v = qkv.view(1, 96, 6, 16)[:, :, :2], qkv.view(1, 96, 6, 16)[:, :, 2:4], qkv.view(1, 96, 6, 16)[:, :, 4:]
    qkv.requires_grad_()
    out = cpu_train.attention(q, k, v, 1.0)
    assert "_Attention" in type(out.grad_fn).__name__ and _denormals(out) == 0
    tiny = torch.tensor([torch.finfo(torch.float32).tiny])
    assert _denormals(tiny / 4) == 1  # the caller's thread still computes denormals
