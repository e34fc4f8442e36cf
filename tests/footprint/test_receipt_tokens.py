"""A fine-tuning receipt counts the tokens actually trained (the real, non-padding tokens of the
rows in each step's batch), not steps x batch x sequence length, so its MFU is a possible one;
a receipt whose MFU exceeds 100% says so loudly."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

import slm
from support.models import make_checkpoint
from slm.cli import main as cli
from slm.finetune.sft import IGNORE, Packed, packed_flops
from slm.footprint import track
from slm.footprint.flops import attention_flops, flops_per_token

WORDS = ("cat", "dog", "sun", "ball", "park", "mom", "red", "blue", "big")



def test_finetune_receipt_counts_real_tokens(tmp_path, tokenizer_dir, capsys, one_thread):
    """The case of the report: a batch far larger than the data (1e9 rows asked, a few there)
    claimed 128e9 tokens and an MFU of 47,640,592%."""
    base = make_checkpoint(str(tmp_path / "base"), "llama", tokenizer_dir)
    pairs = [{"prompt": f"Say {w} please", "completion": f"{w} {w} {w}"} for w in WORDS]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "ft"
    steps = 6
    cli(["finetune", "--model", base, "--data", str(data), "--out", str(out), "--lora", "--max-steps", str(steps),
         "--batch-size", "1000000000", "--seq-len", "64", "--val-fraction", "0", "--replay", "0"])
    assert "--batch-size 1000000000 is more than the" in capsys.readouterr().err
    # every step trains every row: the conversations' own tokens, counted here without packing
    tok = slm.load(base).tokenizer
    per_step = sum(len(tok.encode_chat([{"role": "user", "content": p["prompt"]},
                                        {"role": "assistant", "content": p["completion"]}],
                                       add_generation_prompt=False)) for p in pairs)
    receipt = json.load(open(out / "receipt.json"))
    rows = json.load(open(out / "finetune.json"))["train_rows"]
    assert per_step < rows * 64  # the rows are padded: the old count would be larger
    assert receipt["tokens"] == {"trained": steps * per_step, "inferred": 0}
    assert 0 < receipt["mfu"] <= 1 and "mfu_impossible" not in receipt
    assert "LoRA" in receipt["flops_formula"]
    # with rehearsal (the default), the model's own answers are inferred tokens, then trained on too
    cli(["finetune", "--model", base, "--data", str(data), "--out", str(tmp_path / "replayed"), "--lora",
         "--max-steps", str(steps), "--batch-size", "1000000000", "--seq-len", "64", "--val-fraction", "0"])
    replayed = json.load(open(tmp_path / "replayed" / "receipt.json"))["tokens"]
    assert replayed["inferred"] > 0 and replayed["trained"] > steps * per_step


def test_validation_passes_are_inferred_tokens(tmp_path, tokenizer_dir, capsys, one_thread):
    base = make_checkpoint(str(tmp_path / "base"), "llama", tokenizer_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "completion": w}) + "\n" for w in WORDS * 2))
    out = tmp_path / "ft"
    cli(["finetune", "--model", base, "--data", str(data), "--out", str(out), "--max-steps", "4",
         "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--val-fraction", "0.2", "--replay", "0"])
    summary, receipt = json.load(open(out / "finetune.json")), json.load(open(out / "receipt.json"))
    tok = slm.load(base).tokenizer
    assert summary["val_conversations"] > 0
    # three validation passes (before training, steps 2 and 4), each over the held-out conversations
    from slm.finetune.sft import read_conversations, split
    _, held_out = split(read_conversations(str(data)), 0.2)
    per_pass = sum(len(tok.encode_chat(m, add_generation_prompt=False)) for m in held_out)
    assert receipt["tokens"]["inferred"] == 3 * per_pass
    assert 0 < receipt["tokens"]["trained"] <= 4 * 2 * 32 and 0 < receipt["mfu"] <= 1


def test_packed_flops_agree_with_the_formula(checkpoint):
    """One conversation filling a row, every token learnt: flops.py's per-token count x T; the
    padding of a half-filled row counts nothing."""
    model = slm.load(checkpoint).model
    cfg, T = model.config, 48
    ids = torch.randint(3, 300, (1, T))
    full = Packed(ids, ids.clone(), torch.arange(T)[None], torch.zeros(1, T, dtype=torch.long))
    n, flops = packed_flops(model, full, "full")
    assert n == T and flops == pytest.approx(T * flops_per_token(cfg, T, training=True), rel=1e-12)
    assert packed_flops(model, full, "eval")[1] == pytest.approx(T * flops_per_token(cfg, T, training=False))
    # LoRA: the frozen weights get input gradients only (4N), attention its whole backward (3x)
    assert packed_flops(model, full, "lora")[1] == pytest.approx(
        2 * T * flops_per_token(cfg, T, training=False) + T * attention_flops(cfg, T))
    half = T // 2
    targets = ids.clone()
    targets[:, half:] = IGNORE
    doc = torch.zeros(1, T, dtype=torch.long)
    doc[:, half:] = 1
    real = torch.arange(T)[None] < half
    padded = Packed(ids, targets, torch.cat([torch.arange(half), torch.arange(T - half)])[None], doc, real)
    n, flops = packed_flops(model, padded, "full")
    assert n == half and flops == pytest.approx(half * flops_per_token(cfg, half, training=True))


def test_an_impossible_mfu_is_flagged(tmp_path):
    stream = io.StringIO()
    with track("finetune", path=str(tmp_path / "r.json"), stream=stream) as r:
        r.add_tokens(10, "trained", flops=1e30)  # no machine computes 1e30 FLOPs in a moment
    receipt = json.load(open(tmp_path / "r.json"))
    assert receipt["mfu"] > 1 and "is above" in receipt["mfu_impossible"]
    assert "WARNING: MFU" in stream.getvalue()
    with track("finetune", path=str(tmp_path / "ok.json"), stream=io.StringIO()) as r:
        r.add_tokens(10, "trained", flops=1e3)
    assert "mfu_impossible" not in json.load(open(tmp_path / "ok.json"))
    with pytest.raises(ValueError, match="non-negative"):
        r.add_tokens(-5, "trained", flops=1.0)


def test_a_resumed_finetune_adds_its_session_to_the_receipt(tmp_path, tokenizer_dir, capsys, monkeypatch, one_thread):
    from slm.finetune import sft
    base = make_checkpoint(str(tmp_path / "base"), "llama", tokenizer_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "completion": w}) + "\n" for w in WORDS * 2))
    out = tmp_path / "ft"
    argv = ["finetune", "--model", base, "--data", str(data), "--out", str(out), "--lora", "--max-steps", "10",
            "--batch-size", "1", "--seq-len", "32", "--save-every", "3", "--val-fraction", "0"]
    real, calls = sft.sft_loss, [0]

    def interrupted(model, batch, checkpoint=False, chunk=1024):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt  # Ctrl-C in step 5: the session's receipt is written, step 3's checkpoint kept
        return real(model, batch, checkpoint, chunk)
    monkeypatch.setattr(sft, "sft_loss", interrupted)
    with pytest.raises(SystemExit):
        cli(argv)
    monkeypatch.undo()
    first = json.load(open(out / "receipt.json"))["tokens"]["trained"]
    cli(argv + ["--resume"])
    receipt = json.load(open(out / "receipt.json"))
    assert len(receipt["sessions"]) == 2 and receipt["sessions"][0]["tokens"]["trained"] == first > 0
    assert receipt["tokens"]["trained"] == first + receipt["sessions"][1]["tokens"]["trained"]
    assert 0 < receipt["mfu"] <= 1
    assert os.path.exists(out / "adapter_model.safetensors")
