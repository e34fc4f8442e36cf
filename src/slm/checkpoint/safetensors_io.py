"""Reading safetensors files straight into a model's parameters.

The `safetensors` library memory-maps a file and hands out tensors; copying those into an already
allocated model briefly holds both. Reading each tensor's bytes with `readinto` into the
parameter's own storage keeps peak memory at the model itself, and checking the header first means
a hostile or truncated file is refused before any large allocation. Writing uses `safetensors`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the file named in the message."""


@dataclass
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: every tensor must lie inside the file, match its
    dtype x shape in size, and not overlap another."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file "
                                      f"(header claims {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: "[[[[...": hostile nesting
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    data_start, data_len = 8 + n, size - 8 - n
    out, spans = {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            b, e = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed or unsupported entry {meta!r}") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension")
            numel *= s
        nbytes = numel * dtype.itemsize
        if not 0 <= b <= e or e - b != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} claims shape {list(shape)} but spans {e - b} bytes")
        if e > data_len:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {e} "
                                  f"but the file holds only {data_len} bytes of data")
        spans.append((b, e, name))
        out[name] = TensorInfo(name, dtype, shape, data_start + b, nbytes)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return out


def read_into(path: str, info: TensorInfo, dst: torch.Tensor) -> None:
    """Fill `dst` (any dtype, any device) with the tensor described by `info`."""
    direct = dst.device.type == "cpu" and dst.dtype == info.dtype and dst.is_contiguous()
    buf = dst if direct else torch.empty(info.shape, dtype=info.dtype)
    view = buf.detach().reshape(-1).view(torch.uint8).numpy() if info.nbytes else None
    if view is not None:
        with open(path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(view))
        if got != info.nbytes:
            raise CheckpointError(f"{path}: truncated while reading tensor {info.name!r}")
    if not direct:
        with torch.no_grad():
            dst.copy_(buf.view(dst.shape))
