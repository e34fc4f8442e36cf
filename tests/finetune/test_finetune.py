"""Supervised fine-tuning: loss only on assistant tokens, packing that isolates conversations,
full fine-tuning that writes a transformers model, and LoRA (also over an int4 base) that teaches
a tiny pretrained model a task it answers on held-out questions."""

from __future__ import annotations

import json
import os

import pytest
import torch

import slm
from support.models import hf_model, make_checkpoint
from slm.cli import main as cli
from slm.finetune.sft import IGNORE, FinetuneConfig, finetune, pack, packed_forward, read_conversations, tokenize_chat



def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_labels_are_the_assistant_turns(tokenizer_dir):
    from slm.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tokenizer_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count to three"},
            {"role": "assistant", "content": "one two three"}]
    ids, labels = tokenize_chat(tok, msgs)
    assert ids == tok.encode_chat(msgs, add_generation_prompt=False) and len(labels) == len(ids)
    learnt = [i for i, l in enumerate(labels) if l != IGNORE]
    assert all(labels[i] == ids[i] for i in learnt)
    # exactly the two replies with their end-of-turn markers, in order
    spans, run = [], []
    for i in learnt:
        if run and i != run[-1] + 1:
            spans.append(run)
            run = []
        run.append(i)
    spans.append(run)
    texts = [tok.decode([ids[i] for i in s], skip_special_tokens=False) for s in spans]
    assert texts == ["Hello!<|im_end|>\n", "one two three<|im_end|>\n"]


def test_packing_keeps_conversations_apart(checkpoint):
    """A packed row computes for each conversation exactly what that conversation gives alone."""
    lm = slm.load(checkpoint)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (23, 9, 30, 14, 5, 40):
        ids = torch.randint(3, 400, (n,), generator=g).tolist()
        examples.append((ids, [IGNORE] * 2 + ids[2:]))
    p = pack(examples, 48)
    assert len(p) < len(examples) and p.ids.shape[1] == 48
    # every example is in exactly one row, whole
    found = sorted(int((p.doc[r] == d).sum()) for r in range(len(p)) for d in p.doc[r].unique().tolist()
                   if (p.targets[r][p.doc[r] == d] != IGNORE).any())
    assert found == sorted(len(x) for x, _ in examples)
    with torch.no_grad():
        hidden = packed_forward(lm.model, p.ids, p.pos, p.doc)
        logits = lm.model.lm_head(hidden)
        for r in range(len(p)):
            for d in p.doc[r].unique().tolist():
                sel = p.doc[r] == d
                if not (p.targets[r][sel] != IGNORE).any():
                    continue  # the row's padding
                alone = lm.model(p.ids[r][sel][None])[0]
                assert (logits[r][sel] - alone).abs().max() < 1e-4


def test_full_finetune_writes_a_transformers_model(tmp_path, tokenizer_dir, one_thread):
    base = make_checkpoint(str(tmp_path / "base"), "llama", tokenizer_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Say {w}", "completion": f"{w} {w}"}
                                              for w in ("cat", "dog", "sun", "ball", "park", "mom") * 4])
    out = str(tmp_path / "ft")
    cli(["finetune", "--model", base, "--data", data, "--out", out, "--max-steps", "12", "--lr", "3e-3",
         "--batch-size", "2", "--seq-len", "64", "--log-every", "2", "--eval-every", "4", "--val-fraction", "0.2"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["step"] == 12 and rows[-1]["loss"] < rows[0]["loss"]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 12]
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    summary = json.load(open(os.path.join(out, "finetune.json")))
    assert summary["val_loss"] < summary["first_val_loss"]
    receipt = json.load(open(os.path.join(out, "receipt.json")))  # the run's energy/CO2/cost receipt
    # the real tokens of the rows trained: fewer than steps x batch x --seq-len (the rows are padded)
    assert receipt["verb"] == "finetune" and 0 < receipt["tokens"]["trained"] < 12 * 2 * 64
    assert receipt["flops"] > 0 and 0 < receipt["mfu"] <= 1
    x = torch.tensor([slm.load(out).tokenizer.encode("Say cat")])
    with torch.no_grad():
        tuned, ref, orig = slm.load(out).model(x), hf_model(out)(x).logits, slm.load(base).model(x)
    assert (tuned - ref).abs().max() < 1e-4 and (tuned - orig).abs().max() > 1e-3


def test_bad_inputs(tmp_path, tokenizer_dir):
    base = make_checkpoint(str(tmp_path / "base"), "llama", tokenizer_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no assistant message"):
        read_conversations(str(bad))
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_conversations(str(bad))
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not UTF-8"):
        read_conversations(str(bad))
    with pytest.raises(ValueError, match="--quantize .* with --lora"):
        FinetuneConfig(model=base, data=str(bad), out=str(tmp_path / "o"), quantize="int4")
    with pytest.raises(SystemExit):
        cli(["finetune", "--model", base, "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])


def error_line(capsys, argv) -> tuple[int, str]:
    """(exit code, the one error line) of a command that must fail."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    # notes, progress and the line naming the loaded model (`slm: NAME: PRECISION`) are not errors
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("note:", "fine-tuning", "slm: "))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return e.value.code, lines[0]


@pytest.mark.parametrize("flag, value", [
    ("--batch-size", "0"), ("--batch-size", "-1"), ("--max-steps", "0"), ("--seq-len", "0"), ("--lora-r", "0"),
    ("--eval-every", "0"), ("--log-every", "0"), ("--save-every", "0"), ("--warmup", "-1"), ("--group-size", "0"),
    ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "nan"), ("--epochs", "0"), ("--epochs", "inf"),
    ("--lora-alpha", "0"), ("--lora-dropout", "1"), ("--lora-dropout", "-0.1"), ("--val-fraction", "1"),
    ("--batch-size", "2.5")])
def test_bad_numbers_are_one_line(tmp_path, capsys, monkeypatch, flag, value):
    from slm.finetune import sft
    monkeypatch.setattr(sft, "read_conversations", lambda path: pytest.fail("worked before checking"))
    code, line = error_line(capsys, ["finetune", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"),
                                     "--out", str(tmp_path / "o"), flag, value])
    assert code in (1, 2) and line.startswith("slm finetune: error:") and flag in line, line
    assert not os.path.exists(tmp_path / "o")


def test_api_checks_numbers_too(tmp_path):
    kw = dict(model="m", data="d.jsonl", out=str(tmp_path / "o"))
    for bad in ({"batch_size": 0}, {"max_steps": -3}, {"lr": float("nan")}, {"lora_r": 0}, {"warmup": -1},
                {"save_every": 0}, {"seq_len": 0}, {"lora_dropout": 1.0}, {"epochs": float("inf")},
                {"batch_size": True}, {"quantize": "int3", "lora": True}, {"grad_clip": 0}):
        with pytest.raises(ValueError, match="--"):
            FinetuneConfig(**kw, **bad)


@pytest.fixture
def small_run(tmp_path, tokenizer_dir):
    """A tiny llama (its context: 256 tokens) and 12 short pairs."""
    base = make_checkpoint(str(tmp_path / "base"), "llama", tokenizer_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Say {w}", "completion": f"{w} {w}"}
                                              for w in ("cat", "dog", "sun", "ball", "park", "mom") * 2])
    return base, data


def test_defaults_fit_the_model_and_the_run(small_run, tmp_path, capsys, one_thread):
    base, data = small_run
    out = str(tmp_path / "ft")
    # --seq-len left out: the model's 256 positions, not the default 512 (an error before)
    cli(["finetune", "--model", base, "--data", data, "--out", out, "--lora", "--max-steps", "12",
         "--batch-size", "1000000000", "--val-fraction", "0"])
    err = capsys.readouterr().err
    summary = json.load(open(os.path.join(out, "finetune.json")))
    assert summary["seq_len"] == 256 and summary["config"]["seq_len"] is None
    # a batch larger than the data: every row each step, said once
    assert summary["batch_size"] == summary["train_rows"] and "note: --batch-size 1000000000 is more than" in err
    assert summary["warmup"] == 2  # a tenth of 12 steps, not the default 10
    # an explicit --seq-len beyond the model's context stays an error
    code, line = error_line(capsys, ["finetune", "--model", base, "--data", data, "--out", str(tmp_path / "o2"),
                                     "--lora", "--seq-len", "512"])
    assert line == "slm finetune: error: --seq-len 512 exceeds the model's context of 256"
    # an explicit warmup longer than the run is kept to half of it, with a note
    cli(["finetune", "--model", base, "--data", data, "--out", str(tmp_path / "o3"), "--lora", "--max-steps", "6",
         "--warmup", "50"])
    assert "note: --warmup 50 is longer than half of the run's 6 steps" in capsys.readouterr().err
    assert json.load(open(tmp_path / "o3" / "finetune.json"))["warmup"] == 3


def test_deeply_nested_data_is_one_line(small_run, tmp_path, capsys):
    base, data = small_run
    nested = tmp_path / "nested.jsonl"
    nested.write_text(open(data).read() + '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    code, line = error_line(capsys, ["finetune", "--model", base, "--data", str(nested), "--out", str(tmp_path / "o")])
    assert code == 1 and line == f"slm finetune: error: {nested}:13: JSON nested too deeply to read"
    code, line = error_line(capsys, ["finetune", "--model", base, "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 1 and line == f"slm finetune: error: {tmp_path} is a folder, not a .jsonl file"
    assert not os.path.exists(tmp_path / "o")


# -- acceptance: LoRA teaches a tiny pretrained model a task, measured on held-out questions ------
KEYS = ["Lily", "Tom", "cat", "dog", "mom", "sun", "ball", "girl", "park", "store"]
VALUES = ["red", "blue", "big", "warm", "happy", "little", "apples", "pears", "three", "five"]
TRAIN_TEMPLATES = ["What is the word for {k}?", "Which word goes with {k}?", "Tell me the word of the {k}.",
                   "The {k} has a word. What is it?", "Say the word that goes with {k}.", "Give me the {k} word."]
HELD_OUT_TEMPLATES = ["What word goes with the {k}?", "I want the word for {k}, please."]


def task(templates):
    return [{"prompt": t.format(k=k), "completion": f"{v}."} for t in templates for k, v in zip(KEYS, VALUES)]


def accuracy(lm, items) -> tuple[float, float]:
    """(greedy exact match, choice accuracy): the reply generated at temperature 0 equals the
    answer; the answer has the highest log-likelihood among the ten possible answers."""
    tok, exact, choice = lm.tokenizer, 0, 0
    for it in items:
        msgs = [{"role": "user", "content": it["prompt"]}]
        exact += lm.chat(msgs, max_new_tokens=8, temperature=0).strip() == it["completion"]
        prefix = tok.encode_chat(msgs)
        scores = []
        for v in VALUES:
            ids = tok.encode_chat(msgs + [{"role": "assistant", "content": f"{v}."}], add_generation_prompt=False)
            with torch.no_grad():
                logp = lm.model(torch.tensor([ids])).log_softmax(-1)[0]
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(prefix), len(ids))))
        choice += VALUES[max(range(len(VALUES)), key=scores.__getitem__)] == it["completion"][:-1]
    return exact / len(items), choice / len(items)


@pytest.fixture(scope="module")
def pretrained(prepared, tmp_path_factory):
    """A tiny Llama pretrained for a few seconds on the `prepared` corpus by slm's Trainer."""
    from slm.model.config import get_config
    from slm.train.loop import TrainConfig, Trainer
    data, tok = prepared
    out = str(tmp_path_factory.mktemp("pretrained") / "base")
    cfg = get_config("slm-1m").replace(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                                      intermediate_size=128)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(TrainConfig(out=out, data=data, tokenizer=tok, seq_len=64, batch_size=16, max_steps=150,
                            optimizer="adamw", lr=3e-3, warmup=10, eval_every=1000, save_every=1000,
                            log_every=50), cfg).train(progress=False)
    finally:
        torch.set_num_threads(n)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_lora_raises_held_out_accuracy(pretrained, tmp_path, one_thread, quantize):
    data = write_jsonl(tmp_path / "train.jsonl", task(TRAIN_TEMPLATES))
    held_out = task(HELD_OUT_TEMPLATES)
    before = accuracy(slm.load(pretrained, quantize=quantize), held_out)
    r = finetune(FinetuneConfig(model=pretrained, data=data, out=str(tmp_path / "lora"), lora=True, lora_r=16,
                                lora_alpha=32, quantize=quantize, max_steps=200, lr=1e-2, batch_size=8, seq_len=128,
                                eval_every=50, log_every=10), progress=False)
    after = accuracy(r["lm"], held_out)
    print(f"{r['train_conversations']} training pairs; held-out accuracy ({quantize or 'fp32'} base) before: exact {before[0]:.0%}, choice {before[1]:.0%}; "
          f"after LoRA: exact {after[0]:.0%}, choice {after[1]:.0%}")
    assert before[0] == 0 and before[1] <= 0.3
    assert after[0] >= 0.3 and after[1] >= 0.4  # chance: 0 and 0.1
    assert os.path.exists(tmp_path / "lora" / "adapter_model.safetensors")


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tokenizer_dir):
    from slm.finetune import lora
    from slm.finetune.sft import sft_loss
    lm = slm.load(make_checkpoint(str(tmp_path / "m"), "gemma3", tokenizer_dir), quantize="int8")
    lora.apply_lora(lm.model, r=4, dropout=0.1)
    with torch.no_grad():
        for layer in lora.lora_layers(lm.model).values():
            for p in layer.lora_B.values():
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    examples = [(ids := torch.randint(3, 400, (n,), generator=g).tolist(), [IGNORE] * 3 + ids[3:]) for n in (20, 12, 30)]
    batch = pack(examples, 32)
    lm.model.train()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)  # the same dropout masks
        loss, n = sft_loss(lm.model, batch, checkpoint=ckpt)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in lm.model.named_parameters() if p.requires_grad})
        lm.model.zero_grad()
    assert n == sum(len(x) - 3 for x, _ in examples)  # every learnt token, and only those
    assert all((grads[0][k] - grads[1][k]).abs().max() < 1e-5 for k in grads[0])
