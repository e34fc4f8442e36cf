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

ARGS = ["--dim", "64", "--layers", "2", "--heads", "4", "--mlp", "128", "--seq-len", "64", "--batch-size", "8",
        "--max-steps", "40", "--warmup", "5", "--eval-every", "10", "--save-every", "5", "--log-every", "5",
        "--optimizer", "adamw", "--schedule", "cosine"]  # pinned: FSDP (sharded matrices) needs AdamW


def train(out, prepared, *extra, wait=True):
    data, tok = prepared
    cmd = [sys.executable, "-m", "slm", "train", "--out", out, "--data", data, "--tokenizer", tok, *ARGS, *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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


def kill_after_checkpoint(proc, out: str, step: int) -> int:
    """kill -9 a training run (its whole process group) once it has checkpointed `step` or later;
    returns the step of the checkpoint it leaves."""
    state = os.path.join(out, "checkpoint", "trainer_state.json")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.load(open(state))["step"] >= step:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # under torchrun: the launcher and its workers
    proc.wait()
    return json.load(open(state))["step"]


def test_resume_after_kill_9_replays_the_same_trajectory(tmp_path, prepared, reference_run):
    out = str(tmp_path / "run")
    proc = train(out, prepared, wait=False)
    killed_at = kill_after_checkpoint(proc, out, 15)
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


@pytest.mark.slow
def test_ddp_under_a_time_budget_keeps_the_processes_together(tmp_path, prepared):
    """--max-minutes under torchrun: the learning rate follows the elapsed time and the run stops
    when it is spent, both by rank 0's clock, so the processes take the same steps with the same
    rates (the trainer checks their step and weights at the end) instead of drifting apart."""
    data, tok = prepared
    out = str(tmp_path / "ddp-time")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", "29519", "-m", "slm", "train", "--out", out, "--data", data, "--tokenizer", tok, *ARGS,
           "--max-steps", "100000", "--max-minutes", "0.1"]
    # 6 s of training: before the shared clock, the processes stopped a step apart and hung there
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    steps = json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))["step"]
    assert steps > 5 and losses(out)[-1][0] == steps


@pytest.mark.slow
def test_fsdp_two_processes_follow_one_process_and_resume(tmp_path, prepared, reference_run):
    """torchrun --fsdp (each process holds half of every weight): the 1-process losses, and a
    kill -9 mid-run resumes onto the same trajectory from the gathered checkpoint."""
    data, tok = prepared
    out = str(tmp_path / "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", "29518", "-m", "slm", "train", "--out", out, "--data", data, "--tokenizer", tok, *ARGS, "--fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    assert 15 <= kill_after_checkpoint(proc, out, 15) < 40
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ours, ref = losses(out), losses(reference_run)
    assert [s for s, _, _ in ours] == [s for s, _, _ in ref]
    worst = max(abs(a - b) for (_, a, _), (_, b, _) in zip(ours, ref))
    print(f"FSDP 2 processes (killed and resumed) vs 1: max |train loss difference| {worst:.2e}")
    assert worst < 1e-3
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)  # the gathered final model is a whole one


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", "0"], "--max-steps must be a positive integer"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--seq-len", "100000"], "fewer than one sequence of --seq-len 100000"),
    (["--max-minutes", "0"], "--max-minutes must be positive"),
])
def test_bad_training_arguments_get_clear_errors(tmp_path, prepared, extra, message):
    data, tok = prepared
    r = subprocess.run([sys.executable, "-m", "slm", "train", "--out", str(tmp_path / "o"), "--data", data,
                        "--tokenizer", tok, *ARGS, *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_training_data_gets_clear_errors(tmp_path, prepared):
    from slm.train.loop import TrainConfig, Trainer
    from slm.runtime.tokenizer import train_tokenizer
    data, tok = prepared
    cfg = slm.get_config("slm-1m")

    def error(**kw):
        with pytest.raises(ValueError) as e:
            Trainer(TrainConfig(**{"out": str(tmp_path / "o"), "data": data, "tokenizer": tok, "seq_len": 32, **kw}), cfg)
        return str(e.value)

    assert "no such data folder" in error(data=str(tmp_path / "missing"))
    os.makedirs(tmp_path / "notprepared")
    assert "no meta.json" in error(data=str(tmp_path / "notprepared"))
    other = str(tmp_path / "tok500")
    train_tokenizer(["some other text " * 50], 400).save(other)
    assert "prepared with a 300-token tokenizer" in error(tokenizer=other)
    import shutil
    cut = str(tmp_path / "cut")
    shutil.copytree(data, cut)
    with open(os.path.join(cut, "train.bin"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(cut, "train.bin")) - 1)
    assert "not a whole number" in error(data=cut)
    assert "unknown optimizer" in error(optimizer="sgd")


def test_resume_refuses_a_different_optimizer(tmp_path, prepared, reference_run):
    import shutil
    out = str(tmp_path / "r")
    shutil.copytree(reference_run, out)
    data, tok = prepared
    r = subprocess.run([sys.executable, "-m", "slm", "train", "--out", out, "--data", data, "--tokenizer", tok, *ARGS,
                        "--max-steps", "60", "--optimizer", "muon", "--resume"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "trained with --optimizer adamw" in r.stderr, r.stderr
