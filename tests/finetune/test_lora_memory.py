"""Peak memory of a LoRA step on the real SmolLM2-135M-Instruct, as `slm finetune --lora` prepares
it: below 1.5 GiB of resident memory (r 8 on every projection, a 512-token row), measured in a
fresh process (benchmarks/lora_memory.py reads its own VmHWM), so that nothing pytest holds counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMIT_GIB = 1.5


@pytest.mark.slow
@pytest.mark.smollm2
def test_lora_step_on_smollm2_peaks_below_limit(smollm2_gguf):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "lora_memory.py"), "--model", smollm2_gguf,
           "--batch", "1", "--steps", "1", "--seq-len", "512"]
    env = {**os.environ, "SLM_RESULTS_DIR": "off", "PYTHONPATH": os.path.join(REPO, "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["base"] == "int4" and result["gradient_checkpointing"] and result["seq_len"] == 512
    assert result["trainable_params"] == 30 * 8 * (4 * 576 + 2 * 192 + 576 + 576 + 3 * (576 + 1536))
    assert result["peak_rss_gib"] < LIMIT_GIB, result
