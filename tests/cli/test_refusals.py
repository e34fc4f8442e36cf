"""Commands that write a model refuse, before loading anything, to destroy one: `slm quantize`,
`slm export` and `slm lora merge` with --out equal to (or inside, or holding) an input, or an --out
that already exists without --overwrite. The refused input and the existing output stay byte for
byte as they were."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from support.models import make_checkpoint


def tree_digest(path: str) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            p = os.path.join(folder, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def slm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slm", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("src") / "model"), "llama", tokenizer_dir)


def one_error_line(r, verb: str, message: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"slm {verb}: error: "), r.stderr
    assert message in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["itself", "inside", "its parent"])
def test_quantize_refuses_to_write_over_its_source(model, where):
    before = tree_digest(os.path.dirname(model))
    out = {"itself": model, "inside": os.path.join(model, "q8"), "its parent": os.path.dirname(model)}[where]
    r = slm("quantize", "--model", model, "--bits", "8", "--out", out, "--overwrite")
    one_error_line(r, "quantize", "writing there would destroy it")
    assert tree_digest(os.path.dirname(model)) == before


def test_existing_outputs_need_overwrite(model, tmp_path):
    """A finished quantized copy, GGUF file or merged model is not replaced without --overwrite;
    with it, it is (atomically)."""
    q = str(tmp_path / "q8")
    assert slm("quantize", "--model", model, "--bits", "8", "--out", q).returncode == 0
    kept = tree_digest(q)
    r = slm("quantize", "--model", model, "--bits", "4", "--out", q)
    one_error_line(r, "quantize", f"--out {q} already exists; pass --overwrite to replace it")
    assert tree_digest(q) == kept
    assert slm("quantize", "--model", model, "--bits", "4", "--out", q, "--overwrite").returncode == 0
    assert tree_digest(q) != kept

    gguf = str(tmp_path / "m.gguf")
    assert slm("export", "--model", model, "--format", "gguf", "--out", gguf).returncode == 0
    data = open(gguf, "rb").read()
    r = slm("export", "--model", model, "--format", "gguf", "--out", gguf, "--dtype", "f16")
    one_error_line(r, "export", "already exists; pass --overwrite")
    assert open(gguf, "rb").read() == data
    r = slm("export", "--model", model, "--format", "hf", "--out", gguf)
    one_error_line(r, "export", "is a file; give a folder")
    r = slm("export", "--model", model, "--format", "gguf", "--out", str(tmp_path))
    one_error_line(r, "export", "is a folder; give a file name")
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_lora_merge_refuses_to_write_over_its_inputs(model, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    before = tree_digest(str(adapter))
    r = slm("lora", "merge", "--model", model, "--adapter", str(adapter), "--out", str(adapter), "--overwrite")
    one_error_line(r, "lora merge", "is (or holds, or lies inside) --adapter")
    assert tree_digest(str(adapter)) == before
