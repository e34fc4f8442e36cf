"""Devices: peak FLOP/s per dtype, board power and a typical price, for MFU, energy estimates and
forecasts. GPU figures are NVIDIA datasheet numbers for dense math (the datasheets' larger
"with sparsity" figures are twice these). This machine's CPU has no datasheet figure that
PyTorch reaches, so its peak is measured: the best rate of a large matmul, cached on disk.

Prices are indicative on-demand cloud rates in USD per device-hour (2024-25; they vary 2-3x
between providers): override with --price or SLM_PRICE_PER_HOUR.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import dataclass, field

import torch

from ..files import atomic_write
from ..settings import cache_dir, env_float

TF = 1e12


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    peak: dict = field(default_factory=dict)  # dtype name (fp32, tf32, bf16, fp16, fp8, int8) -> dense FLOP/s
    watts: float = 0.0  # board power (TDP); for a CPU: watts per busy core
    price_per_hour: float = 0.0  # USD per device-hour
    kind: str = "gpu"
    source: str = ""

    def peak_flops(self, dtype: str = "bf16") -> float | None:
        """Peak for a dtype; a GPU without bf16 units (T4) reports its fp16 tensor-core peak."""
        if dtype in self.peak:
            return self.peak[dtype]
        return self.peak.get("fp16") if dtype == "bf16" else None


_A100 = {"fp64": 9.7 * TF, "fp32": 19.5 * TF, "tf32": 156 * TF, "bf16": 312 * TF, "fp16": 312 * TF, "int8": 624 * TF}
_A100_SRC = "NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4): FP32 19.5, TF32 156, BF16/FP16 312 TFLOPS dense"
_H100_SXM = {"fp64": 34 * TF, "fp32": 67 * TF, "tf32": 494.7 * TF, "bf16": 989.4 * TF, "fp16": 989.4 * TF,
             "fp8": 1978.9 * TF, "int8": 1978.9 * TF}
_H100_PCIE = {"fp64": 26 * TF, "fp32": 51 * TF, "tf32": 378 * TF, "bf16": 756 * TF, "fp16": 756 * TF,
              "fp8": 1513 * TF, "int8": 1513 * TF}

GPUS: dict[str, Device] = {d.key: d for d in [
    Device("a100-40gb-sxm", "NVIDIA A100 40GB SXM", _A100, 400, 1.29, source=_A100_SRC + "; 400 W"),
    Device("a100-80gb-sxm", "NVIDIA A100 80GB SXM", _A100, 400, 1.79, source=_A100_SRC + "; 400 W"),
    Device("a100-40gb-pcie", "NVIDIA A100 40GB PCIe", _A100, 250, 1.29, source=_A100_SRC + "; 250 W"),
    Device("a100-80gb-pcie", "NVIDIA A100 80GB PCIe", _A100, 300, 1.49, source=_A100_SRC + "; 300 W"),
    Device("h100-sxm", "NVIDIA H100 SXM", _H100_SXM, 700, 2.99,
           source="NVIDIA H100 datasheet: FP32 67, TF32 494.7, BF16 989.4, FP8 1978.9 TFLOPS dense; up to 700 W"),
    Device("h100-pcie", "NVIDIA H100 PCIe", _H100_PCIE, 350, 2.49,
           source="NVIDIA H100 datasheet (PCIe): FP32 51, TF32 378, BF16 756, FP8 1513 TFLOPS dense; 300-350 W"),
    Device("h200", "NVIDIA H200 SXM", _H100_SXM, 700, 3.49,
           source="NVIDIA H200 datasheet: same tensor cores as H100 SXM (BF16 989.4, FP8 1978.9 dense); up to 700 W"),
    Device("l4", "NVIDIA L4", {"fp32": 30.3 * TF, "tf32": 60 * TF, "bf16": 121 * TF, "fp16": 121 * TF,
                               "fp8": 242 * TF, "int8": 242 * TF}, 72, 0.80,
           source="NVIDIA L4 datasheet: FP32 30.3, TF32 60, BF16 121, FP8 242 TFLOPS dense; 72 W"),
    Device("t4", "NVIDIA T4", {"fp32": 8.1 * TF, "fp16": 65 * TF, "int8": 130 * TF}, 70, 0.35,
           source="NVIDIA T4 datasheet: FP32 8.1, FP16 (mixed precision) 65 TFLOPS, INT8 130 TOPS; no bf16; 70 W"),
    Device("rtx-4090", "NVIDIA GeForce RTX 4090", {"fp32": 82.6 * TF, "bf16": 165.2 * TF, "fp16": 165.2 * TF,
                                                   "fp8": 330.3 * TF}, 450, 0.40,
           source="NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): FP32 82.6, FP16/BF16 tensor with FP32 "
                  "accumulate 165.2, FP8 330.3 TFLOPS dense; 450 W"),
]}

# Marketing names and torch.cuda.get_device_name() spellings -> table keys, most specific first.
_ALIASES = [
    (("a100", "80", "pcie"), "a100-80gb-pcie"), (("a100", "pcie"), "a100-40gb-pcie"),
    (("a100", "80"), "a100-80gb-sxm"), (("a100",), "a100-40gb-sxm"),
    (("h100", "pcie"), "h100-pcie"), (("h100",), "h100-sxm"), (("h200",), "h200"),
    (("l4",), "l4"), (("t4",), "t4"), (("4090",), "rtx-4090"),
]

# A CPU core running matmuls: 4-10 W on server parts (TDP over cores: EPYC 7763 280 W / 64,
# Xeon 8380 270 W / 40), about 10 W on desktops.
CPU_WATTS_PER_CORE = 8.0
CPU_PRICE_PER_CORE_HOUR = 0.04  # general-purpose cloud VMs, on demand, per vCPU


def find_gpu(name: str) -> Device:
    """A table entry by key ("a100-80gb-sxm") or by a looser name ("A100-SXM4-80GB", "H100 PCIe")."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    words = key.replace("_", "-").replace(" ", "-")
    for parts, k in _ALIASES:
        if all(p in words for p in parts) and not (parts == ("l4",) and "l40" in words):
            return GPUS[k]
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _cache_path() -> str:
    return cache_dir("cpu_peak.json")


def measure_cpu_peak(dtype: torch.dtype = torch.float32, seconds: float = 0.4) -> float:
    """The best of three windows of 2048x2048 matmuls (large enough for the BLAS to reach its peak)."""
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(3):
        t, k = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            a @ b
            k += 1
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t))
    return best


@functools.lru_cache(maxsize=None)
def cpu_peak(dtype: torch.dtype = torch.float32, refresh: bool = False) -> float:
    """This machine's measured matmul peak for a dtype, cached in ~/.cache/slm/cpu_peak.json per
    (CPU model, threads, torch version, dtype): measuring takes a second or two. The cache keeps the
    best rate ever measured, because a measurement on a busy machine comes out low; `refresh`
    (training runs, which are long anyway) measures again and keeps the better of the two."""
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}"
    path = _cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    old = cache.get(key) if isinstance(cache.get(key), (int, float)) else None
    if old is None or refresh:
        cache[key] = max(measure_cpu_peak(dtype), old or 0.0)
        try:
            with atomic_write(path) as f:
                json.dump(cache, f, indent=1)
        except (OSError, ValueError):  # ValueError: the path is a folder
            pass  # a read-only home: measure again next time
    return float(cache[key])


def cpu_device(dtype: torch.dtype = torch.float32, refresh: bool = False) -> Device:
    cores = torch.get_num_threads()
    return Device("cpu", f"{cpu_name()} ({cores} threads)", {_dtype_name(dtype): cpu_peak(dtype, refresh)},
                  watts=env_float("SLM_CPU_WATTS_PER_CORE", CPU_WATTS_PER_CORE),
                  price_per_hour=CPU_PRICE_PER_CORE_HOUR * cores, kind="cpu",
                  source=f"peak: measured {_dtype_name(dtype)} matmul on this machine ({cores} threads)")


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    if isinstance(dtype, str):
        return dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def detect(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           refresh: bool = False) -> Device:
    """The table entry for a torch device: a known GPU by name, an unknown GPU with no peak (its MFU
    is not reported), or this CPU with its measured peak."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            return find_gpu(name)
        except ValueError:
            return Device("gpu", name, {}, watts=300.0, kind="gpu", source="not in the device table: 300 W assumed")
    return cpu_device(dtype or torch.float32, refresh)


def peak_flops(device: torch.device, dtype: torch.dtype | None = None, refresh: bool = False) -> float:
    """Dense peak FLOP/s for MFU: bf16 on GPUs (mixed precision training), the measured matmul rate
    in `dtype` (default fp32) on the CPU. An unknown GPU gets 100 TFLOP/s."""
    device = torch.device(device)
    d = detect(device, dtype, refresh)
    if device.type == "cuda":
        return d.peak_flops(_dtype_name(dtype) if dtype is not None else "bf16") or 100 * TF
    return d.peak_flops(_dtype_name(dtype or torch.float32))
