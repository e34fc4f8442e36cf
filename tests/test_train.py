"""Training: a real run writes a model transformers loads; resume after kill -9 replays the exact
trajectory of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import slm
from conftest import CORPUS
from slm.data.prepare import prepare
from slm.tokenizer import train_tokenizer

ARGS = ["--dim", "64", "--layers", "2", "--heads", "4", "--mlp", "128", "--seq-len", "64", "--batch-size", "8",
        "--max-steps", "40", "--warmup", "5", "--eval-every", "10", "--save-every", "5", "--log-every", "5"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    docs = [f"Story {i}. " + CORPUS[i % 5] for i in range(400)]
    tok = train_tokenizer(docs, 300)
    tok.save(str(d / "tok"))
    (d / "c.txt").write_text("\n\n".join(docs))
    prepare(str(d / "c.txt"), tok, str(d / "data"), progress=False)
    return str(d / "data"), str(d / "tok")


def train(out, prepared, *extra, wait=True):
    data, tok = prepared
    cmd = [sys.executable, "-m", "slm", "train", "--out", out, "--data", data, "--tokenizer", tok, *ARGS, *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, prepared):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    train(out, prepared)
    return out


def test_training_writes_a_transformers_model(reference_run):
    rows = losses(reference_run)
    assert [s for s, _, _ in rows] == list(range(5, 41, 5))
    assert rows[-1][1] < rows[0][1] - 0.5  # it learns
    assert os.path.exists(os.path.join(reference_run, "loss.png"))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ref = AutoModelForCausalLM.from_pretrained(reference_run).eval()
    tok = AutoTokenizer.from_pretrained(reference_run)
    lm = slm.load(reference_run)
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    assert ids[0].tolist() == lm.tokenizer.encode("Once upon a time")
    with torch.no_grad():
        assert (lm.model(ids) - ref(ids).logits).abs().max() < 1e-4


def test_resume_after_kill_9_replays_the_same_trajectory(tmp_path, prepared, reference_run):
    out = str(tmp_path / "run")
    proc = train(out, prepared, wait=False)
    state = os.path.join(out, "checkpoint", "trainer_state.json")
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once a mid-run checkpoint exists
        try:
            if json.load(open(state))["step"] >= 15:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.load(open(state))["step"]
    assert 15 <= killed_at < 40, "the run should have been killed mid-way"
    train(out, prepared, "--resume")
    assert losses(out) == losses(reference_run)
    a, b = slm.load(out).model.state_dict(), slm.load(reference_run).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_two_processes_follow_one_process(tmp_path, prepared, reference_run):
    """torchrun with 2 processes (gloo, CPU) at the same global batch reaches the same losses as 1."""
    data, tok = prepared
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", "29517", "-m", "slm", "train", "--out", out, "--data", data, "--tokenizer", tok, *ARGS]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))["world_size"] == 2
    ours, ref = losses(out), losses(reference_run)
    assert [s for s, _, _ in ours] == [s for s, _, _ in ref]
    worst = max(abs(a - b) for (_, a, _), (_, b, _) in zip(ours, ref))
    worst_val = max(abs(a - b) for (_, _, a), (_, _, b) in zip(ours, ref) if a is not None)
    print(f"2 processes vs 1: max |train loss difference| {worst:.2e}, validation {worst_val:.2e}")
    assert worst < 1e-3 and worst_val < 1e-3
