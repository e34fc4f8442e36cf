"""`slm bench`: a registry architecture at full size with random weights, for memory and speed.

    slm bench --preset llama-2-13b --random-weights --quantize int4

No real weights can be downloaded here, so the model is built on the meta device and each linear
layer, and the embedding, is then given random fp32 weights and quantized on its own, one at a
time: the full fp32 model never exists, and resident memory stays near the quantized size.
Reports the process's resident memory (psutil: what the machine has to hold) and batch-1 greedy
decode tokens/s.
Random weights decode at the same speed as real ones: every step reads every weight once.
"""

from __future__ import annotations

import time

import torch

from .accel import accelerate
from .checkpoint.loader import new_empty_model
from .model.config import get_config
from .quant.apply import StreamingQuantizer
from .quant.layers import weight_bytes


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


@torch.no_grad()
def random_model(preset: str, quantize: str | None = None, group_size: int | None = None, seed: int = 0):
    """The preset's architecture with N(0, 0.02) weights, quantized layer by layer (the embedding
    too) by the quantizer that quantizes checkpoints while they load."""
    cfg = get_config(preset)
    model = new_empty_model(cfg, torch.float32, "cpu", lazy_weights=bool(quantize))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.is_meta:  # norms, biases, and every weight when not quantizing
            if "norm" in name:
                p.fill_(0.0 if cfg.norm_plus_one else 1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    if quantize:
        quantizer = StreamingQuantizer(model, quantize, group_size)
        for name, p in list(model.named_parameters()):  # a tied head is listed once, as the embedding
            if p.is_meta:
                w = quantizer.storage(name)
                w.normal_(0.0, 0.02, generator=g)
                quantizer.written(name, w.shape[0])
        quantizer.finish()
    return accelerate(model.eval())  # the decoding kernels, as slm.load gives them


@torch.no_grad()
def decode_speed(model, new_tokens: int = 32, prompt_len: int = 8, warmup: int = 4) -> float:
    """Batch-1 greedy decode tokens/s over the KV cache (after a short prompt and a few warm-up steps)."""
    cache = model.new_cache(batch=1, max_len=prompt_len + warmup + new_tokens + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    tok = model(ids, cache=cache, last_only=True).argmax(-1)
    for _ in range(warmup):
        tok = model(tok, cache=cache).argmax(-1)
    t = time.perf_counter()
    for _ in range(new_tokens):
        tok = model(tok, cache=cache).argmax(-1)
    return new_tokens / (time.perf_counter() - t)


def run(preset: str, quantize: str | None = None, group_size: int | None = None, new_tokens: int = 32,
        threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    rss0 = _rss()
    t = time.perf_counter()
    model = random_model(preset, quantize, group_size)
    build_s = time.perf_counter() - t
    rss_model = _rss()
    tps = decode_speed(model, new_tokens)
    return {"preset": preset, "quantize": quantize or "fp32",
            "group_size": getattr(model, "quantization", {}).get("group_size"),
            "weights_GiB": weight_bytes(model) / 2**30, "rss_GiB": _rss() / 2**30,
            "rss_after_build_GiB": rss_model / 2**30, "rss_before_GiB": rss0 / 2**30,
            "build_s": build_s, "tokens_per_s": tps, "threads": torch.get_num_threads()}
