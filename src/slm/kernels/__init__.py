"""Hand-written kernels. Triton kernels for training on GPUs: `cross_entropy.py` (the loss, with or
without the LM head), `glu.py` (SwiGLU/GeGLU), `rope.py` (rotary embedding and the Q/K/V split),
`triton_launch.py` (which of them run). The rest of this module: the C++ CPU kernels in `cpu/`,
compiled on first use; `decoder.py`, a whole batch-1 decoding step in one call to them;
`cpu_train.py`, the CPU training step's GLU, rotation, RMSNorm and attention, with autograd;
`abi.py`, the numbers for layouts, norms, blocks and roles that Python passes to them.

`cpu/` (AVX2 + FMA + F16C, threads from ATen's pool; a few functions compiled for AVX-512 too,
run only where the CPU has it and SLM_NO_AVX512 is unset) registers `torch.ops.slm_cpu.*` and
`torch.classes.slm_cpu.Decoder`:
  matvec_int8.cpp  `linear`, `dequantize`: int8 weight-only linear layers
  matvec_int4.cpp  `linear_q4`, `dequantize_q4`: int4
  matvec_gguf.cpp  `linear_gguf`, `dequantize_gguf`: a GGUF file's Q8_0/Q5_0/Q4_K/Q6_K blocks as they are
  matvec_f32.cpp   `matvec_f32`: one-row fp32 products when decoding
  norm_rope.cpp    `rms_norm`, `rms_norm_rope`, `rms_norm_add`
  gelu.cpp         `gelu_tanh_mul`;  argmax.cpp: `argmax_rows`
  sample.cpp       `sample_top_p`: sampling's draw with a temperature and top-p (runtime/sampling.py)
  attention.cpp    `attn_decode` (one query over the cache), `attn_step` (the step between the products)
  train.cpp        the CPU training step's `softmax_xent_` (cross-entropy's softmax and gradient in
                   place, train/loss.py), `rms_norm_train`, `glu_train`, `rope_qk_train`, `attn_train`
                   (causal attention) and their backwards (autograd in `cpu_train.py`)
  decoder.cpp      the `Decoder` class (decoder.h): a whole batch-1 step
  register.cpp     the schemas and registrations, and `abi_constants` (abi.h, which abi.py copies)
  simd.h, rows.h, matvec.h, ops.h, abi.h: what the files share; all.cpp: #includes them all
`cpu_ops()` returns `torch.ops.slm_cpu`, and `matvec_f32_op()`, `rms_norm_op()` and `fused_op(name)`
single ops, or None where the kernels cannot be built: no C++ compiler, no AVX2, not x86-64, or
`SLM_NO_KERNELS=1`. Callers then use a pure-PyTorch path with the same results, and a warning says
so once (`kernel_error()` says why).

The library is built by calling the C++ compiler directly ($CXX, else c++) against the headers and
libraries of the installed torch: `torch.utils.cpp_extension.load` would need ninja, and the
kernels need no Python bindings (the ops register themselves with the dispatcher when loaded).
One call compiles `cpu/all.cpp`, one translation unit (~15-20 s once; the files compiled apart
take ~3x as long, each parsing the torch headers). The library is cached in `$SLM_CACHE/kernels`
(default `~/.cache/slm/kernels`), keyed by every source and header in `cpu/`, the flags, the
compiler and the torch version.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import torch

from .. import settings

_CPU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu")
_UNITY = os.path.join(_CPU_DIR, "all.cpp")  # #includes every .cpp: one translation unit, one compiler call
# -fvisibility=hidden: the files share functions through their headers, and nothing outside the
# library calls them (the ops register themselves when it is loaded)
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-w",
          "-fvisibility=hidden"]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" -> torch.ops.slm_cpu, or None after a failure; "error" -> why


def cache_dir() -> str:
    return settings.cache_dir("kernels")


def _unsupported() -> str | None:
    if settings.switch("SLM_NO_KERNELS"):
        return "disabled by SLM_NO_KERNELS"
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        return f"needs Linux/x86-64, this is {sys.platform}/{platform.machine()}"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"needs a CPU with AVX2, torch reports {cap}"
    return None


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx)


def _sources() -> list[str]:
    """Every file the library is built from (the .cpp files and their headers), sorted."""
    return sorted(os.path.join(_CPU_DIR, f) for f in os.listdir(_CPU_DIR) if f.endswith((".cpp", ".h")))


def _build(cxx: str) -> str:
    """Compile cpu/ unless a library for these sources/flags/torch/compiler is cached; return its path."""
    from torch.utils import cpp_extension

    src = hashlib.sha256()
    for path in _sources():
        with open(path, "rb") as f:
            src.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = _FLAGS + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(b"\0".join([src.digest(), " ".join(flags).encode(), torch.__version__.encode(),
                                     cxx.encode(), "".join(version).encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    lib = os.path.join(out_dir, f"slm_cpu_{key}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    links = [f"-L{p}" for p in libdirs] + [f"-Wl,-rpath,{p}" for p in libdirs] + ["-lc10", "-ltorch_cpu"]
    print("slm: compiling the CPU kernels (once, ~20 s)", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, *includes, _UNITY, "-o", tmp, *links],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: a concurrent build of the same key writes the same library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


def cpu_ops():
    """torch.ops.slm_cpu, the CPU kernels' namespace (building and loading the library on the
    first call), or None."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        ops, why = None, _unsupported()
        if why is None and not hasattr(torch.ops.slm_cpu, "linear"):
            cxx = _compiler()
            if cxx is None:
                why = "no C++ compiler found (set CXX, or install g++)"
            else:
                try:
                    torch.ops.load_library(_build(cxx))
                except Exception as e:  # noqa: BLE001 - any build or load failure means: fall back
                    why = f"could not build it: {e}"
        if why is None:
            ops = torch.ops.slm_cpu
        elif not why.startswith("disabled"):
            warnings.warn(f"slm: CPU kernels unavailable ({why}); using the slower PyTorch paths "
                          "(int8/int4: dequantize, then matmul)", RuntimeWarning, stacklevel=3)
        _state["ops"], _state["error"] = ops, why
        return ops


def matvec_f32_op():
    """torch.ops.slm_cpu.matvec_f32, the fp32 one-row product used when decoding, or None."""
    if "f32" not in _state:
        _state["f32"] = torch.ops.slm_cpu.matvec_f32.default if cpu_ops() is not None else None
    return _state["f32"]


def rms_norm_op():
    """torch.ops.slm_cpu.rms_norm, one fused RMSNorm for fp32 rows on the CPU, or None."""
    if "norm" not in _state:
        _state["norm"] = torch.ops.slm_cpu.rms_norm.default if cpu_ops() is not None else None
    return _state["norm"]


def fused_op(name: str):
    """torch.ops.slm_cpu.<name> (rms_norm_rope, rms_norm_add, gelu_tanh_mul, attn_decode,
    argmax_rows: the fused decoding helpers; softmax_xent_, attn_train and the other training
    kernels), or None where the kernels are unavailable."""
    key = "op:" + name
    if key not in _state:  # attn_train is left out of a torch without sgemm_ (cpu/register.cpp)
        op = getattr(torch.ops.slm_cpu, name, None) if cpu_ops() is not None else None
        _state[key] = op.default if op is not None else None
    return _state[key]


def kernel_error() -> str | None:
    """Why the CPU kernels are unavailable (None: they are loaded, or nobody asked for them yet)."""
    return _state.get("error")  # type: ignore[return-value]
