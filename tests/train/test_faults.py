"""Faults while training: kill -9 at seeded random moments (one of them while a checkpoint is
being written), resumed each time from the last checkpoint, ends with exactly the model of an
uninterrupted run; every checkpoint left behind loads; running out of disk while saving keeps the
previous checkpoint and says so."""

from __future__ import annotations

import glob
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import slm
from test_train import ARGS, kill_after_checkpoint, losses

pytestmark = pytest.mark.slow


def start(out, prepared, log, *extra, preexec_fn=None):
    data, tok = prepared
    cmd = [sys.executable, "-m", "slm", "train", "--out", out, "--data", data, "--tokenizer", tok, *ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
                            preexec_fn=preexec_fn)


def check_checkpoint(out) -> int:
    """The checkpoint folder loads whole (model, optimizer state, trainer state); its step."""
    ckpt = os.path.join(out, "checkpoint")
    state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
    model = slm.load(os.path.join(ckpt, "model")).model
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert load_file(os.path.join(ckpt, "trainer_state.safetensors"))
    return state["step"]


def saving(out) -> bool:
    return bool(glob.glob(os.path.join(out, ".tmp-checkpoint-*")))


def kill(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    proc = start(out, prepared, out + ".log")
    assert proc.wait(600) == 0, open(out + ".log").read()[-3000:]
    return out


def progress(log) -> int:
    """The last step the run's progress bar (tqdm, on stderr) has shown."""
    steps = re.findall(r"(\d+)/40 \[", open(log).read())
    return int(steps[-1]) if steps else -1


def test_sigkill_at_random_moments_then_resume(tmp_path, prepared, uninterrupted):
    rng = random.Random(20261126)
    out, log = str(tmp_path / "run"), str(tmp_path / "train.log")
    # Kill points drawn from the seed: a step to reach and a delay after it (so kills fall anywhere in
    # a step, not only after checkpoints), and once the instant a checkpoint is being written.
    plan = ["step", "during save", "step", "step"]
    survived, during_save, last_step, extra = 0, 0, 0, ()
    for what in plan:
        proc = start(out, prepared, log, *extra)
        while extra and proc.poll() is None and "resuming from" not in open(log).read():
            time.sleep(0.01)  # a resumed run: wait until it has taken up its checkpoint
        if what == "step":
            target, delay = min(38, last_step + rng.randint(2, 8)), rng.uniform(0, 0.5)
            while proc.poll() is None and progress(log) < target:
                time.sleep(0.01)
            time.sleep(delay)
        else:  # poll the folder until a save is under way (a missed one: the next save)
            target = delay = None
            while proc.poll() is None and not saving(out):
                time.sleep(0.0005)
        if proc.poll() is not None:
            pytest.fail(f"the run ended before kill {survived + 1}")
        kill(proc)
        survived += 1
        if what == "during save" and saving(out):
            during_save += 1  # the half-written folder is still there: killed mid-save
        if extra:  # each resume started from the checkpoint the previous run left
            line = open(log).read().split("resuming from", 1)[1].splitlines()[0]
            assert line.endswith(f"at step {last_step}"), line
        if os.path.exists(os.path.join(out, "checkpoint")):
            step = check_checkpoint(out)  # every checkpoint left behind loads whole
            assert step >= last_step
            last_step = step
        extra = ("--resume",)
        print(f"kill {survived} ({what}" + (f", step {target} + {delay:.2f} s" if target else "")
              + f"): killed at step {progress(log)}, checkpoint at step {last_step}")
    proc = start(out, prepared, log, "--resume")
    assert proc.wait(600) == 0, open(log).read()[-3000:]
    assert f"resuming from {os.path.join(out, 'checkpoint')} at step {last_step}" in open(log).read()
    print(f"{survived} kills survived ({during_save} during a checkpoint write); final step {check_checkpoint(out)}")
    assert survived >= 3 and during_save >= 1
    assert not saving(out)  # the resume cleared the half-written folders
    assert losses(out) == losses(uninterrupted)
    a, b = slm.load(out).model.state_dict(), slm.load(uninterrupted).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_between_the_renames_of_a_commit(tmp_path, prepared, uninterrupted):
    """hf._commit swaps folders with two renames; a kill between them leaves out/checkpoint missing,
    the old one at .tmp-checkpoint-X.old and the new, complete one at .tmp-checkpoint-X. Resume
    takes the new one."""
    out = str(tmp_path / "run")
    proc = start(out, prepared, str(tmp_path / "a.log"))
    step = kill_after_checkpoint(proc, out, 20)
    old = str(tmp_path / "old")  # the replaced checkpoint: marked as an earlier step, to see which one is taken
    shutil.copytree(os.path.join(out, "checkpoint"), old)
    state = json.load(open(os.path.join(old, "trainer_state.json")))
    json.dump({**state, "step": step - 5}, open(os.path.join(old, "trainer_state.json"), "w"))
    os.replace(os.path.join(out, "checkpoint"), os.path.join(out, ".tmp-checkpoint-x1y2"))
    os.replace(old, os.path.join(out, ".tmp-checkpoint-x1y2.old"))
    proc = start(out, prepared, str(tmp_path / "c.log"), "--resume")
    assert proc.wait(600) == 0
    assert f"at step {step}" in open(tmp_path / "c.log").read()
    assert not saving(out) and losses(out) == losses(uninterrupted)


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    return apply


@pytest.mark.parametrize("how", ["RLIMIT_FSIZE", "full tmpfs"])
def test_out_of_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, prepared, uninterrupted, how):
    if how == "full tmpfs":  # a real ENOSPC: needs root to mount
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)]).returncode:
            pytest.skip("mounting a small tmpfs needs root")
        out = str(mnt / "run")
    else:
        out = str(tmp_path / "run")
    try:
        proc = start(out, prepared, str(tmp_path / "a.log"))
        step = kill_after_checkpoint(proc, out, 10)
        before = {f: open(f, "rb").read() for f in glob.glob(os.path.join(out, "checkpoint", "**", "*"), recursive=True)
                  if os.path.isfile(f)}
        log = str(tmp_path / "b.log")
        if how == "full tmpfs":  # fill the disk, leaving too little room for a second checkpoint
            # a save the kill cut short would be deleted by the resumed run, freeing its space for
            # the new checkpoint: deleted first, so the ballast leaves what it means to
            for leftover in glob.glob(os.path.join(out, ".tmp-checkpoint-*")):
                shutil.rmtree(leftover) if os.path.isdir(leftover) else os.remove(leftover)
            st = os.statvfs(mnt)
            with open(mnt / "ballast", "wb") as f:  # leave half a checkpoint free
                f.write(b"\0" * (st.f_bavail * st.f_frsize - sum(len(v) for v in before.values()) // 2))
            proc = start(out, prepared, log, "--resume")
        else:
            proc = start(out, prepared, log, "--resume", preexec_fn=_limit_file_size(64 * 1024))
        assert proc.wait(600) == 1
        err = open(log).read()
        print(re.search(r"slm train: error: .*", err).group(0))
        assert "Traceback" not in err
        assert f"slm train: error: could not write the checkpoint of step {step + 5}" in err
        assert f"the previous checkpoint (step {step}) in {os.path.join(out, 'checkpoint')} is intact" in err
        assert ("File too large" if how == "RLIMIT_FSIZE" else "No space left") in err, err[-2000:]
        after = {f: open(f, "rb").read() for f in before}
        assert after == before and check_checkpoint(out) == step and not saving(out)
        if how == "full tmpfs":
            os.remove(mnt / "ballast")
        proc = start(out, prepared, str(tmp_path / "c.log"), "--resume")  # space again: it carries on
        assert proc.wait(600) == 0, open(tmp_path / "c.log").read()[-2000:]
        assert losses(out) == losses(uninterrupted)
    finally:
        if how == "full tmpfs":
            subprocess.run(["umount", "-l", str(mnt)])
