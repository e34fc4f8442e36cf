"""Loading: streaming memory, and a clear error naming the file for every bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import slm
from support.models import make_checkpoint


@pytest.fixture
def llama_dir(tmp_path, tokenizer_dir):
    return make_checkpoint(str(tmp_path / "llama"), "llama", tokenizer_dir)


def shards(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def test_pickle_checkpoint_is_refused(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(slm.CheckpointError, match=r"only pickle checkpoints \(pytorch_model.bin\).*safetensors.*"
                                                  r"save_pretrained"):
        slm.load(str(d))


def test_missing_folder_and_config(tmp_path, llama_dir):
    with pytest.raises(slm.CheckpointError, match="no such model folder"):
        slm.load(str(tmp_path / "nope"))
    os.remove(os.path.join(llama_dir, "config.json"))
    with pytest.raises(slm.CheckpointError, match=r"config.json: file not found"):
        slm.load(llama_dir)


def test_missing_weights(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(slm.CheckpointError, match="no model.safetensors"):
        slm.load(str(d))


def test_missing_shard(llama_dir):
    os.remove(os.path.join(llama_dir, shards(llama_dir)[1]))
    with pytest.raises(slm.CheckpointError, match=r"index.json: lists shard model-00002-of-\d+.safetensors which is missing"):
        slm.load(llama_dir)


def test_truncated_shard(llama_dir):
    f = os.path.join(llama_dir, shards(llama_dir)[0])
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) - 100])
    with pytest.raises(slm.CheckpointError, match=rf"{os.path.basename(f)}: truncated: tensor .* ends at byte"):
        slm.load(llama_dir)


def test_corrupt_header(llama_dir):
    f = os.path.join(llama_dir, shards(llama_dir)[0])
    data = bytearray(open(f, "rb").read())
    data[8:12] = b"\xff\xfe{{"
    open(f, "wb").write(data)
    with pytest.raises(slm.CheckpointError, match=rf"{os.path.basename(f)}: corrupt safetensors header"):
        slm.load(llama_dir)


def test_header_claiming_terabytes(llama_dir):
    f = os.path.join(llama_dir, shards(llama_dir)[0])
    data = bytearray(open(f, "rb").read())
    data[:8] = (2**40).to_bytes(8, "little")
    open(f, "wb").write(data)
    with pytest.raises(slm.CheckpointError, match=r"corrupt or truncated safetensors file \(header claims 1099511627776"):
        slm.load(llama_dir)


def test_unknown_model_type(llama_dir):
    p = os.path.join(llama_dir, "config.json")
    cfg = json.load(open(p))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(p, "w"))
    with pytest.raises(slm.CheckpointError, match=r"config.json: unsupported model_type 'gpt2'; slm supports llama"):
        slm.load(llama_dir)


def test_shapes_disagree_with_config(llama_dir):
    p = os.path.join(llama_dir, "config.json")
    cfg = json.load(open(p))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(p, "w"))
    with pytest.raises(slm.CheckpointError, match=r"\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' has shape "
                                                  r"\[\d+, \d+\] but config.json implies \[\d+, \d+\]"):
        slm.load(llama_dir)


def test_missing_tensor(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file
    f = os.path.join(llama_dir, shards(llama_dir)[-1])
    tensors = load_file(f)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(slm.CheckpointError, match=r"checkpoint lacks 1 tensor\(s\)"):
        slm.load(llama_dir)


def test_bad_config_values(llama_dir):
    p = os.path.join(llama_dir, "config.json")
    cfg = json.load(open(p))
    cfg["num_key_value_heads"] = 3
    json.dump(cfg, open(p, "w"))
    with pytest.raises(slm.CheckpointError, match=r"config.json: num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        slm.load(llama_dir)
    open(p, "w").write("{not json")
    with pytest.raises(slm.CheckpointError, match=r"config.json: not valid JSON"):
        slm.load(llama_dir)


def test_save_is_atomic_and_overwrites(tmp_path, llama_dir):
    lm = slm.load(llama_dir)
    out = str(tmp_path / "out")
    lm.save(out)
    lm.save(out, max_shard_bytes=30_000)  # overwrite, now sharded
    assert "model.safetensors.index.json" in os.listdir(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    again = slm.load(out)
    assert all(torch.equal(a, b) for a, b in zip(lm.model.parameters(), again.model.parameters()))


@pytest.mark.slow
def test_streaming_load_peak_memory(tmp_path, tokenizer_dir):
    """Peak RSS while loading a sharded ~130 MB checkpoint stays under 1.3 x the model's size."""
    path = make_checkpoint(str(tmp_path / "big"), "llama", None, shard="20MB", hidden_size=512,
                           intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=8)
    assert len(shards(path)) >= 5
    code = textwrap.dedent(f"""
        import slm, torch

        def status(key):  # kB figures from the kernel
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM), inherited across fork
        before = status("VmRSS:")
        lm = slm.load({path!r})
        size = sum(p.numel() * p.element_size() for p in lm.model.parameters())
        print(size, status("VmHWM:") - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    size, grew = map(int, out.split())
    assert size > 100e6
    assert grew < 1.3 * size, f"loading grew RSS by {grew / size:.2f}x the model size"
