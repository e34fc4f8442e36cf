"""Fine-tuning never loses a run: checkpoints every --save-every steps, an exact --resume (after an
interruption, a kill -9 at random moments, or a kill between the renames of a checkpoint's commit),
a finished run that a new run refuses to replace without --overwrite, and a checkpoint that does
not fit the run (other settings, another model, truncated or corrupt files) refused in one line
that names the file."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from support.models import make_checkpoint
from slm.cli import main as cli
from slm.finetune import sft
from slm.finetune.sft import FinetuneConfig, finetune

WORDS = "cat dog sun ball park mom red blue big warm happy little apples pears three five".split()
ARGS = ["--max-steps", "24", "--batch-size", "2", "--save-every", "5", "--lr", "3e-3", "--seq-len", "64",
        "--log-every", "2", "--eval-every", "6", "--val-fraction", "0.15"]



@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("base") / "llama"), "llama", tokenizer_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    with open(path, "w") as f:
        for i, w in enumerate(WORDS * 2):
            f.write(json.dumps({"prompt": f"Say {w} {i}", "completion": f"{w} {w} and {WORDS[i % 7]}"}) + "\n")
    return str(path)


def config(base, data, out, lora=True, **kw) -> FinetuneConfig:
    """ARGS as a FinetuneConfig: LoRA with dropout, so that resuming must restore the RNG too."""
    kw = {"max_steps": 24, "batch_size": 2, "save_every": 5, "lr": 3e-3, "seq_len": 64, "log_every": 2,
          "eval_every": 6, "val_fraction": 0.15, **kw}
    return FinetuneConfig(model=base, data=data, out=str(out), lora=lora, lora_dropout=0.1 if lora else 0.05, **kw)


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C during the given training step (1-based): its first micro-batch's forward raises
    KeyboardInterrupt."""
    real_accumulate, real_loss, steps = sft.accumulate, sft.sft_loss, [0]

    def accumulate(*args, **kw):
        steps[0] += 1
        return real_accumulate(*args, **kw)

    def loss(*args, **kw):
        out = real_loss(*args, **kw)
        if torch.is_grad_enabled() and steps[0] == step:  # validation runs under no_grad
            raise KeyboardInterrupt
        return out
    monkeypatch.setattr(sft, "accumulate", accumulate)
    monkeypatch.setattr(sft, "sft_loss", loss)


def results(out) -> tuple:
    """What must be bitwise equal between runs: every step's loss, the logged losses, the weights."""
    summary = json.load(open(os.path.join(out, "finetune.json")))
    rows = [{k: v for k, v in json.loads(line).items() if k != "learnt_tokens_per_s"}
            for line in open(os.path.join(out, "metrics.jsonl"))]
    name = "adapter_model.safetensors" if os.path.exists(os.path.join(out, "adapter_model.safetensors")) \
        else "model.safetensors"
    weights = load_file(os.path.join(out, name))
    return summary["train_losses"], summary["first_val_loss"], summary["val_loss"], rows, weights


def assert_same(a, b) -> None:
    assert a[:4] == b[:4]
    assert a[4].keys() == b[4].keys() and all(torch.equal(a[4][k], b[4][k]) for k in a[4])


def tree(folder) -> dict[str, str]:
    """Every file under folder and its sha256."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def fails(capsys, argv, code=1) -> str:
    """Run the CLI expecting one error line; returns it."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("slm ")]
    assert e.value.code == code and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def uninterrupted(base, data, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for lora in (True, False):
            out = tmp_path_factory.mktemp("ref") / ("lora" if lora else "full")
            finetune(config(base, data, out, lora), progress=False)
            assert not os.path.exists(out / "checkpoint")  # removed once the results are written
            runs[lora] = results(out)
        return runs
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_interrupted_then_resumed_is_exact(base, data, tmp_path, monkeypatch, one_thread, uninterrupted, lora):
    out = tmp_path / "run"
    for stop in (8, 9):  # step 8 (after the checkpoint of step 5), then step 9 of the resumed run (step 14)
        interrupt_at(monkeypatch, stop)
        with pytest.raises(KeyboardInterrupt):
            finetune(config(base, data, out, lora), progress=False, resume=os.path.exists(out / "checkpoint"))
        monkeypatch.undo()
        state = json.load(open(out / "checkpoint" / "trainer_state.json"))
        assert state["step"] == (5 if stop == 8 else 10) and len(state["losses"]) == state["step"]
    r = finetune(config(base, data, out, lora), progress=False, resume=True)
    assert r["resumed"] and not os.path.exists(out / "checkpoint")
    assert_same(results(out), uninterrupted[lora])
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary folder left behind


def test_resume_after_a_kill_between_the_renames_of_a_commit(base, data, tmp_path, monkeypatch, one_thread,
                                                             uninterrupted):
    """hf._commit swaps folders with two renames; a kill between them leaves no out/checkpoint, the
    old one at .tmp-checkpoint-X.old and the new, complete one at .tmp-checkpoint-X: resume takes
    the new one. A save cut short (another .tmp-checkpoint-Y) is cleared."""
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 13)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(base, data, out), progress=False)
    monkeypatch.undo()
    old = tmp_path / "old"  # the replaced checkpoint, marked as an earlier step to see which one is taken
    shutil.copytree(out / "checkpoint", old)
    state = json.load(open(old / "trainer_state.json"))
    json.dump({**state, "step": 5, "losses": state["losses"][:5]}, open(old / "trainer_state.json", "w"))
    os.replace(out / "checkpoint", out / ".tmp-checkpoint-x1y2")
    os.replace(old, out / ".tmp-checkpoint-x1y2.old")
    (out / ".tmp-checkpoint-half").mkdir()
    (out / ".tmp-checkpoint-half" / "weights.safetensors").write_bytes(b"\0" * 10)
    monkeypatch.setattr(sft, "note", lambda text: None)
    r = finetune(config(base, data, out), progress=False, resume=True)
    assert r["resumed"] and json.load(open(out / "finetune.json"))["train_losses"][:10] == state["losses"]
    assert_same(results(out), uninterrupted[True])
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_finished_run_is_not_replaced(base, data, tmp_path, capsys, one_thread):
    out = str(tmp_path / "run")
    argv = ["finetune", "--model", base, "--data", data, "--out", out, "--lora", *ARGS]
    cli(argv)
    capsys.readouterr()
    before = tree(out)
    line = fails(capsys, argv)
    assert "already holds" in line and "--resume" in line and "--overwrite" in line
    assert tree(out) == before  # byte for byte
    line = fails(capsys, argv + ["--resume"])  # finished: no checkpoint left to resume
    assert "finished run" in line and "--overwrite" in line
    assert tree(out) == before
    line = fails(capsys, argv + ["--resume", "--overwrite"], code=2)
    assert line.startswith("slm finetune: error:") and "not allowed with" in line
    assert tree(out) == before
    # --out naming the model's own folder: refused even with --overwrite
    line = fails(capsys, ["finetune", "--model", base, "--data", data, "--out", base, "--overwrite", *ARGS])
    assert "is the --model folder" in line
    # --overwrite replaces it, leaving no file of the old run (here: a full model replaced by an adapter)
    cli(["finetune", "--model", base, "--data", data, "--out", out, "--overwrite", *ARGS[:2]])
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    cli(argv + ["--overwrite"])
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert sorted(os.listdir(out)) == sorted(before)


def test_out_that_is_a_file(base, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.write_text("mine")
    loaded = []
    monkeypatch.setattr(sft, "load", lambda *a, **k: loaded.append(a))  # no work before the check
    for extra in ([], ["--resume"], ["--overwrite"]):
        line = fails(capsys, ["finetune", "--model", base, "--data", data, "--out", str(out), *extra])
        assert line == f"slm finetune: error: --out {out} is a file; give a folder"
    assert out.read_text() == "mine" and not loaded and os.listdir(tmp_path) == ["out"]


@pytest.fixture
def interrupted(base, data, tmp_path, monkeypatch, one_thread) -> str:
    """A LoRA run stopped at step 8, its checkpoint at step 5."""
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(base, data, out), progress=False)
    monkeypatch.undo()
    return str(out)


def test_resume_refuses_a_checkpoint_that_does_not_fit(base, data, interrupted, tmp_path, tokenizer_dir, capsys):
    ckpt = os.path.join(interrupted, "checkpoint")
    state_json = os.path.join(ckpt, "trainer_state.json")
    argv = ["finetune", "--model", base, "--data", data, "--out", interrupted, "--lora", "--lora-dropout", "0.1",
            "--resume", *ARGS]
    before = tree(interrupted)

    line = fails(capsys, argv + ["--lora-r", "16"])  # other settings
    assert line.startswith(f"slm finetune: error: {state_json}: ") and "--lora-r 8" in line and "--lora-r 16" in line
    line = fails(capsys, [a if a != "3e-3" else "1e-3" for a in argv])
    assert state_json in line and "--lr" in line
    wider = make_checkpoint(str(tmp_path / "wider"), "llama", tokenizer_dir, hidden_size=96)  # another architecture
    line = fails(capsys, [a if a != base else wider for a in argv])
    assert state_json in line and "different model" in line and "hidden_size" in line
    other = tmp_path / "other.jsonl"  # other data
    other.write_text(open(data).read().replace("Say", "Tell"))
    line = fails(capsys, [a if a != data else str(other) for a in argv])
    assert state_json in line and "other conversations" in line
    assert tree(interrupted) == before  # nothing touched by a refused resume

    def broken(name, how):
        path = os.path.join(ckpt, name)
        keep = open(path, "rb").read()
        how(path, keep)
        try:
            return fails(capsys, argv)
        finally:
            open(path, "wb").write(keep)

    for name in ("trainer_state.safetensors", "weights.safetensors"):
        path = os.path.join(ckpt, name)
        line = broken(name, lambda p, b: open(p, "wb").write(b[:len(b) * 2 // 3]))  # truncated
        assert line.startswith(f"slm finetune: error: {path}: ") and "truncated" in line
        line = broken(name, lambda p, b: open(p, "wb").write(b[:5]))
        assert path in line and "not a safetensors file" in line
        line = broken(name, lambda p, b: os.remove(p))
        assert path in line and "missing" in line
    line = broken("trainer_state.json", lambda p, b: open(p, "wb").write(b[:len(b) // 2]))  # corrupt JSON
    assert line.startswith(f"slm finetune: error: {state_json}: not valid JSON")
    line = broken("trainer_state.json", lambda p, b: open(p, "w").write("[" * 100_000 + "]" * 100_000))
    assert state_json in line and "nested too deeply" in line
    line = broken("trainer_state.json", lambda p, b: open(p, "w").write(json.dumps({**json.loads(b), "step": "5"})))
    assert state_json in line and "'step'" in line
    assert tree(interrupted) == before
    r = finetune(config(base, data, interrupted), progress=False, resume=True)  # and the intact one resumes
    assert r["resumed"]


# -- acceptance: kill -9 at random moments, then --resume ------------------------------------------
STEPS = 60


def start(out, base, data, log, *extra):
    cmd = [sys.executable, "-m", "slm", "finetune", "--model", base, "--data", data, "--out", out, "--lora",
           "--lora-dropout", "0.1", "--max-steps", str(STEPS), "--batch-size", "2", "--save-every", "4",
           "--lr", "3e-3", "--seq-len", "128", "--eval-every", "10", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def progress(log) -> int:
    """The last step the run's progress bar (tqdm, on stderr) has shown."""
    steps = re.findall(rf"(\d+)/{STEPS} \[", open(log).read())
    return int(steps[-1]) if steps else -1


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(base, data, tmp_path):
    ref = str(tmp_path / "ref")
    proc = start(ref, base, data, ref + ".log")
    assert proc.wait(300) == 0, open(ref + ".log").read()[-3000:]
    rng = random.Random(20261204)
    out, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    last_step, kills, extra = 0, 0, ()
    for _ in range(4):
        proc = start(out, base, data, log, *extra)
        # a step to reach and a delay after it, drawn from the seed: kills fall anywhere in a step,
        # in a validation pass or in a checkpoint's write
        # (at most STEPS - 12: the bar lags the run by up to 0.1 s, and the run must not end first)
        target, delay = min(STEPS - 12, max(last_step, progress(log)) + rng.randint(2, 10)), rng.uniform(0, 0.05)
        while proc.poll() is None and progress(log) < target:
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is not None:
            pytest.fail(f"the run ended before kill {kills + 1}: " + open(log).read()[-2000:])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        if extra and last_step:  # each resume started from the checkpoint the previous run left
            assert f"resuming from {os.path.join(out, 'checkpoint')} at step {last_step}" in open(log).read()
        state = os.path.join(out, "checkpoint", "trainer_state.json")
        if os.path.exists(state):
            step = json.load(open(state))["step"]
            assert step >= last_step
            last_step = step
        print(f"kill {kills}: at step {progress(log)} (+{delay:.3f} s), checkpoint at step {last_step}")
        extra = ("--resume",)
    proc = start(out, base, data, log, "--resume")
    assert proc.wait(300) == 0, open(log).read()[-3000:]
    assert f"at step {last_step}" in open(log).read() and last_step > 0
    assert_same(results(out), results(ref))
    assert open(os.path.join(out, "adapter_model.safetensors"), "rb").read() == \
        open(os.path.join(ref, "adapter_model.safetensors"), "rb").read()
    assert not [n for n in os.listdir(out) if n.startswith(".")]
