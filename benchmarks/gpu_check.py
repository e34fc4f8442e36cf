"""CUDA path check (run on a machine with a GPU): parity with transformers on tiny checkpoints of
every family in fp32 on the GPU, bf16 greedy decoding, and batch-1 decode tokens/s in bf16.

    python benchmarks/gpu_check.py
"""

import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import slm  # noqa: E402
from support.models import FAMILIES, build_tokenizer, make_checkpoint  # noqa: E402
from slm.runtime.generate import generate_ids  # noqa: E402


def main() -> None:
    assert torch.cuda.is_available(), "no GPU"
    print(torch.cuda.get_device_name(), torch.__version__)
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        build_tokenizer(d + "/tok")
        for name, (family, kw) in FAMILIES.items():
            path = make_checkpoint(f"{d}/{name}", family, d + "/tok", **kw)
            ids = torch.randint(0, 400, (2, 48), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
            ours = slm.load(path, dtype=torch.float32, device="cuda")
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
            with torch.no_grad():
                diff = (ours.model(ids) - ref(ids).logits).abs().max().item()
            bf = slm.load(path, device="cuda")  # default on CUDA: bf16
            out = [s[0] for s in generate_ids(bf.model, [ids[0, :10].tolist()], 16)]
            print(f"{name:<14} fp32 max|diff| {diff:.2e}  bf16 dtype {bf.model.dtype}  "
                  f"bf16 greedy ok: {len(out) == 16}")
            assert diff < 1e-3
        for preset in ("stories110m", "slm-124m"):
            cfg = slm.get_config(preset)
            model = slm.Transformer(cfg).cuda().to(torch.bfloat16).eval()
            model.init_weights()
            prompt = list(range(3, 19))
            for _ in range(2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                n = sum(1 for _ in generate_ids(model, [prompt], 256))
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
            print(f"{preset}: bf16 batch-1 decode {n / dt:.0f} tok/s")


if __name__ == "__main__":
    main()
