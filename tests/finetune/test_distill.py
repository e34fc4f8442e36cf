"""Distillation from a teacher: a real `slm serve` process through the OpenAI-compatible route,
killed with SIGKILL partway and resumed without duplicated or lost records; prompt erasure;
the built-in prompt set; a record cut off mid-write is dropped on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import slm
from support.models import make_checkpoint
from slm.finetune.distill import GENERIC_SYSTEM, STRATEGIES, LocalTeacher, distill, record_id, recover
from slm.finetune.prompts import builtin_prompts, is_correct

MAX_TOKENS = 24


def lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_distill(url, prompts, out, *extra, wait=True):
    cmd = [sys.executable, "-m", "slm", "data", "distill", "--teacher", url, "--prompts", prompts, "--out", out,
           "--max-tokens", str(MAX_TOKENS), "--strategy", "explain", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher") / "tiny"), "llama", tokenizer_dir)


@pytest.mark.slow
def test_distill_from_slm_serve_resumes_after_kill(teacher_dir, tmp_path):
    from support.server import Server
    items = builtin_prompts(30, seed=1)
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for it in items + [{**items[3], "prompt": "  " + items[3]["prompt"] + " "}, items[7]]:  # 2 repeats
            f.write(json.dumps(it) + "\n")
    out = str(tmp_path / "distilled.jsonl")
    server = Server(teacher_dir, str(tmp_path / "server.log"))
    try:
        run_distill(server.url, str(prompts), out, "--limit", "6")  # stopped cleanly a fifth of the way
        first = open(out, "rb").read()
        assert len(lines(out)) == 6
        proc = run_distill(server.url, str(prompts), out, wait=False)
        deadline = time.time() + 120
        while len(open(out, "rb").read().split(b"\n")) < 14 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)  # mid-run, as a crash or an OOM kill
        proc.wait()
        killed_at = open(out, "rb").read().count(b"\n")
        assert 6 < killed_at < 30 and open(out, "rb").read().startswith(first)
        with open(out, "ab") as f:  # and a record torn mid-write, as a crash during write() leaves it
            f.write(b'{"id": "0123456789abcdef", "messages": [{"role": "sys')
        stdout = run_distill(server.url, str(prompts), out)
        assert f"{killed_at} already there, 2 duplicate prompts skipped" in stdout
        # without the openai package the teacher speaks plain HTTP (urllib): the same replies
        from slm.finetune.distill import HTTPTeacher
        plain, client = HTTPTeacher(server.url + "/v1/"), HTTPTeacher(server.url)
        plain.client = None
        plain.name = plain._first_model()
        ask = [{"role": "system", "content": STRATEGIES["direct"]}, {"role": "user", "content": items[0]["prompt"]}]
        assert plain.name == client.name == "tiny"
        assert plain(ask, MAX_TOKENS, 0.0) == client(ask, MAX_TOKENS, 0.0)
    finally:
        server.stop()

    records = lines(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 30  # nothing duplicated, nothing lost
    assert set(ids) == {record_id(it["prompt"], "explain") for it in items}
    assert open(out, "rb").read().startswith(first)  # earlier records untouched
    # prompt erasure: the teacher was asked with the strategy's instruction, the record keeps a generic one;
    # the reply is what the teacher model gives in-process (greedy), so nothing was garbled on the way
    lm = slm.load(teacher_dir)
    by_prompt = {it["prompt"]: it for it in items}
    for r in records[:5] + records[-5:]:
        system, user, reply = r["messages"]
        assert system == {"role": "system", "content": GENERIC_SYSTEM} and user["role"] == "user"
        assert r["strategy"] == "explain" and r["teacher"] == "tiny"
        expected = lm.chat([{"role": "system", "content": STRATEGIES["explain"]}, user], max_new_tokens=MAX_TOKENS,
                           temperature=0).strip()
        assert reply == {"role": "assistant", "content": expected}
        assert r["answer"] == by_prompt[user["content"]]["answer"] and isinstance(r["correct"], bool)


def test_local_teacher_and_sft_format(teacher_dir, tmp_path):
    from slm.finetune.sft import read_conversations
    out = str(tmp_path / "d.jsonl")
    items = builtin_prompts(3)
    teacher = LocalTeacher(teacher_dir)
    stats = distill(teacher, items, out, "step-by-step", max_tokens=8, progress=False)
    assert stats["written"] == 3 and stats["checked"] == 3
    again = distill(teacher, items + items, out, "step-by-step", max_tokens=8, progress=False)
    assert again["written"] == 0 and again["already_done"] == 3
    other = distill(teacher, items[:1], out, "direct", max_tokens=8, progress=False)  # another strategy: new record
    assert other["written"] == 1
    convs = read_conversations(out)  # the output is fine-tuning data as it stands
    assert len(convs) == 4 and all(c[0]["content"] == GENERIC_SYSTEM for c in convs)


def test_recover_drops_only_a_torn_last_record(tmp_path):
    path = tmp_path / "o.jsonl"
    good = [json.dumps({"id": f"{i:016x}", "messages": []}) + "\n" for i in range(3)]
    path.write_text("".join(good) + '{"id": "ffff", "mess')
    assert recover(str(path)) == {f"{i:016x}" for i in range(3)}
    assert path.read_text() == "".join(good)
    path.write_text("".join(good) + good[0].strip())  # a complete object whose newline never made it
    assert len(recover(str(path))) == 3 and path.read_text() == "".join(good)
    path.write_text(good[0] + "garbage\n" + good[1])
    with pytest.raises(ValueError, match="o.jsonl:2"):
        recover(str(path))


def test_builtin_prompts_are_checkable():
    items = builtin_prompts(200)
    assert len({it["prompt"] for it in items}) == 200
    assert {it["kind"] for it in items} == {"add", "sub", "mul", "cmp", "fact"}
    for it in items:
        ref = it.get("reference", it["answer"])
        assert is_correct(it, ref), it  # the synthetic world's own worked answer is right
        if it["kind"] in ("add", "sub", "mul"):
            assert not is_correct(it, f"The answer is {int(it['answer']) + 1}.")
        if it["kind"] == "cmp":
            loser = next(c for c in it["choices"] if c != it["answer"])
            assert not is_correct(it, f"{loser} has more.")


def test_bad_distill_inputs(tmp_path, teacher_dir):
    from slm.cli import main as cli
    with pytest.raises(SystemExit):
        cli(["data", "distill", "--teacher", str(tmp_path / "nope"), "--prompts", "builtin", "--out", str(tmp_path / "o")])
    from support.server import free_port
    with pytest.raises(SystemExit):  # no server there: one line on stderr, exit 1
        cli(["data", "distill", "--teacher", f"http://127.0.0.1:{free_port()}", "--prompts", "builtin",
             "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="unknown strategy"):
        distill(None, [], str(tmp_path / "o.jsonl"), "guess")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": ""}\n')
    from slm.finetune.distill import read_prompts
    with pytest.raises(ValueError, match="p.jsonl:1"):
        read_prompts(str(bad))


def test_echoing_a_fact_question_is_not_an_answer():
    item = {"prompt": "Where do fish live?", "answer": "Fish live in water.", "kind": "fact"}
    assert not is_correct(item, "Where do fish live? Fish live, fish live.")
    assert is_correct(item, "Fish live in the water of rivers and seas.")


@pytest.mark.parametrize("extra, says", [
    (["--n-prompts", "-3"], "--n-prompts: must be at least 1"), (["--n-prompts", "0"], "--n-prompts"),
    (["--max-tokens", "0"], "--max-tokens"), (["--limit", "0"], "--limit"), (["--limit", "-2"], "--limit"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"), (["--temperature", "nan"], "--temperature"),
    (["--out", "FOLDER"], "is a folder; give a file name")])
def test_bad_distill_numbers_are_refused_before_any_work(tmp_path, capsys, monkeypatch, extra, says):
    """Each one line naming the flag, before the teacher is loaded (it does not exist here)."""
    from slm.cli import main as cli
    from slm.finetune import distill as distill_mod
    monkeypatch.setattr(distill_mod, "make_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    extra = [str(tmp_path) if x == "FOLDER" else x for x in extra]
    with pytest.raises(SystemExit) as e:
        cli(["data", "distill", "--teacher", str(tmp_path / "nope"), "--prompts", "builtin",
             "--out", str(tmp_path / "o.jsonl"), *extra])
    err = capsys.readouterr().err
    assert e.value.code in (1, 2) and len(err.splitlines()) == 1 and err.startswith("slm data distill: error:")
    assert says in err and not os.path.exists(tmp_path / "o.jsonl")


def test_bad_prompt_files(tmp_path):
    from slm.finetune.distill import read_prompts
    with pytest.raises(ValueError, match="--n-prompts must be a positive integer, got -3"):
        read_prompts("builtin", -3)
    nested = tmp_path / "p.jsonl"
    nested.write_text('{"prompt": "hi"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: JSON nested too deeply to read"):
        read_prompts(str(nested))
    latin = tmp_path / "p.txt"
    latin.write_bytes("caf\u00e9?\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"p.txt: not UTF-8"):
        read_prompts(str(latin))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="is a folder"):
        read_prompts(str(tmp_path))
    out = tmp_path / "o.jsonl"  # an output holding a line nested too deeply: named, not a RecursionError
    out.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"o.jsonl:1: not a record written by slm data distill"):
        recover(str(out))
