"""Hostile or corrupt model files are refused with a clear message before any large allocation:
safetensors headers claiming terabytes, overlapping or out-of-file tensors, tokenizer.json merges
over unknown tokens, config.json with absurd sizes. The files are written for real and loaded
through `slm.load` (and the CLI); a child process loading all of them keeps its peak memory."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

import slm
from support.models import make_checkpoint
from slm import CheckpointError

TB = 1 << 40


@pytest.fixture(scope="module")
def good(tmp_path_factory, tokenizer_dir) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("good")), "llama", tokenizer_dir, shard="10MB")


def write_safetensors(path: str, header: dict, data: bytes = b"", header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def copy_with(good: str, dst: str, name: str, writer) -> str:
    shutil.copytree(good, dst)
    writer(os.path.join(dst, name))
    return dst


def weights_header(good: str) -> tuple[dict, bytes]:
    with open(os.path.join(good, "model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        return header, f.read()


def bad_weights(good, dst, case: str) -> str:
    header, data = weights_header(good)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]], header[names[1]]
    header_len = None
    if case == "header claims terabytes":
        header_len = 4 * TB
    elif case == "tensor claims terabytes":
        first["shape"], first["data_offsets"] = [1 << 20, 1 << 20], [0, 4 * TB]  # 4 TiB of F32 in a small file
    elif case == "shape larger than its bytes":
        first["shape"] = [1 << 20, 1 << 20]  # offsets unchanged
    elif case == "overlapping tensors":
        b, e = first["data_offsets"]
        size = second["data_offsets"][1] - second["data_offsets"][0]
        second["data_offsets"] = [b + 4, b + 4 + size]
    elif case == "offsets past the end":
        b, e = second["data_offsets"]
        second["data_offsets"] = [b + len(data), e + len(data)]
    elif case == "nested JSON":
        pass
    return copy_with(good, dst, "model.safetensors", lambda p: (
        open(p, "wb").write(struct.pack("<Q", 200_002) + b"[" * 100_001 + b"]" * 100_001) if case == "nested JSON"
        else write_safetensors(p, header, data, header_len)))


WEIGHT_CASES = {
    "header claims terabytes": "corrupt or truncated safetensors file (header claims 4398046511104 bytes",
    "tensor claims terabytes": "truncated: tensor",
    "shape larger than its bytes": "claims shape [1048576, 1048576] but spans",
    "overlapping tensors": "overlap",
    "offsets past the end": "truncated: tensor",
    "nested JSON": "corrupt safetensors header (not valid JSON)",
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_bad_safetensors_are_refused(good, tmp_path, case):
    path = bad_weights(good, str(tmp_path / "m"), case)
    with pytest.raises(CheckpointError) as e:
        slm.load(path)
    assert WEIGHT_CASES[case] in str(e.value) and "model.safetensors" in str(e.value), str(e.value)


def bad_tokenizer(good, dst) -> str:
    def write(p):
        tj = json.load(open(p))
        tj["model"]["merges"].append(["never_seen", "token_xyz"])
        json.dump(tj, open(p, "w"))
    return copy_with(good, dst, "tokenizer.json", write)


def test_tokenizer_with_bad_merges_is_refused(good, tmp_path):
    path = bad_tokenizer(good, str(tmp_path / "m"))
    with pytest.raises(CheckpointError) as e:
        slm.load(path)
    msg = str(e.value)
    assert "tokenizer.json: cannot be read as a tokenizer" in msg and "never_seen" in msg and "out of vocabulary" in msg


CONFIG_CASES = {
    "hidden_size 1e9": ({"hidden_size": 1_000_000_000}, "hidden_size = 1,000,000,000 is beyond any real model"),
    "hidden_size 1e9 as a float": ({"hidden_size": 1e9}, "hidden_size must be a positive integer, got 1000000000.0"),
    "negative layers": ({"num_hidden_layers": -2}, "num_layers must be a positive integer, got -2"),
    "vocabulary of 2^40": ({"vocab_size": 1 << 40}, "vocab_size = 1,099,511,627,776 is beyond any real model"),
    "every size at its bound": ({"hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 1 << 12,
                                 "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 10, "head_dim": 128},
                                "parameters, more than 10,000,000,000,000"),
    "zero heads": ({"num_attention_heads": 0}, "num_heads must be a positive integer, got 0"),
    "in bounds, but not these weights": ({"hidden_size": 1 << 14, "intermediate_size": 1 << 16,
                                          "num_hidden_layers": 256}, "but the weight files hold only"),
    "context of true": ({"max_position_embeddings": True}, "max_seq_len must be a positive integer, got True"),
    # An epsilon that is not positive makes every logit NaN: refused, not an empty reply with exit code 0.
    "negative norm epsilon": ({"rms_norm_eps": -1e-5}, "norm_eps must be a positive finite number, got -1e-05"),
    "NaN norm epsilon": ({"rms_norm_eps": float("nan")}, "norm_eps must be a positive finite number, got nan"),
    "zero norm epsilon": ({"rms_norm_eps": 0}, "norm_eps must be a positive finite number, got 0.0"),
    "epsilon as a word": ({"rms_norm_eps": "small"}, "a field of the wrong type or value"),
    "rope settings as a list": ({"rope_parameters": [1, 2]}, "a field of the wrong type or value"),
}


def bad_config(good, dst, change: dict) -> str:
    def write(p):
        cfg = json.load(open(p))
        cfg.update(change)
        json.dump(cfg, open(p, "w"))
    return copy_with(good, dst, "config.json", write)


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_absurd_configs_are_refused(good, tmp_path, case):
    change, message = CONFIG_CASES[case]
    path = bad_config(good, str(tmp_path / "m"), change)
    with pytest.raises(CheckpointError) as e:
        slm.load(path)
    assert message in str(e.value) and "config.json" in str(e.value), str(e.value)


@pytest.mark.parametrize("content, message", [
    ("[]", "expected a JSON object {...}, got list"), ("null", "expected a JSON object {...}, got NoneType"),
    ("[" * 100_000, "JSON nested too deeply to read"), (b"{\"model_type\": \"ll\xe1ma\"}", "not UTF-8"),
    (None, "is a folder, not a JSON file")])
def test_config_json_that_is_not_an_object_is_refused(good, tmp_path, content, message):
    def write(p):
        os.remove(p)
        if content is None:
            os.mkdir(p)
        else:
            open(p, "wb").write(content if isinstance(content, bytes) else content.encode())
    path = copy_with(good, str(tmp_path / "m"), "config.json", write)
    with pytest.raises(CheckpointError) as e:
        slm.load(path)
    assert message in str(e.value) and "config.json" in str(e.value), str(e.value)


def test_gguf_with_a_negative_epsilon_is_refused(good, tmp_path):
    from slm.checkpoint.gguf_write import write_gguf
    lm = slm.load(good)
    lm.model.config.norm_eps = -1e-6  # as a corrupt or hostile file's metadata would say
    write_gguf(lm, str(tmp_path / "m.gguf"))
    with pytest.raises(CheckpointError, match="norm_eps must be a positive finite number"):
        slm.load(str(tmp_path / "m.gguf"))


def test_the_cli_says_so_in_one_line(good, tmp_path):
    path = bad_weights(good, str(tmp_path / "m"), "tensor claims terabytes")
    r = subprocess.run([sys.executable, "-m", "slm", "generate", "--model", path, "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("slm generate: error: ") and "truncated: tensor" in r.stderr, r.stderr


CHILD = r"""
import json, resource, sys
import slm
folders = json.loads(sys.argv[1])
slm.load(folders.pop("good"))  # the baseline: a real model loaded once
def hwm():  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) pytest parent
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
base = hwm()
errors = {}
for case, path in folders.items():
    try:
        slm.load(path)
        errors[case] = None
    except slm.CheckpointError as e:
        errors[case] = str(e)
peak = hwm()
print(json.dumps({"base_kib": base, "peak_kib": peak, "errors": errors}))
"""


def test_no_large_allocation_before_refusing(good, tmp_path):
    """One process loads every bad file after a good one: its peak RSS must not grow (a file
    claiming terabytes would otherwise reach the allocator)."""
    folders = {"good": good}
    for i, case in enumerate(WEIGHT_CASES):
        folders[case] = bad_weights(good, str(tmp_path / f"w{i}"), case)
    for i, (case, (change, _)) in enumerate(CONFIG_CASES.items()):
        folders[case] = bad_config(good, str(tmp_path / f"c{i}"), change)
    folders["bad merges"] = bad_tokenizer(good, str(tmp_path / "t"))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(folders)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(out["errors"].values()), out["errors"]  # every one refused
    grew = (out["peak_kib"] - out["base_kib"]) / 1024
    print(f"peak RSS while refusing {len(folders) - 1} hostile files: +{grew:.1f} MiB over {out['base_kib'] / 1024:.0f} MiB")
    assert grew < 32
