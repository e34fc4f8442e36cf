"""`slm chat` as a person uses it: on a real terminal (tmux), with pastes, Esc+Enter, Ctrl-C,
Ctrl-D, the commands and a history longer than the model's context; and the real default chat
model answering through piped input."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from support.models import make_checkpoint

TMUX = "/usr/bin/tmux"
# Starting slm, and a first reply: a first run on a machine compiles slm's C++ kernels (minutes on
# a busy one). Waits poll the screen; these are their deadlines, not sleeps.
FIRST = 300
REPLY = 120


@pytest.fixture
def terminal(tmp_path):
    """A tmux server of this test's own (its socket in tmp_path), killed afterwards."""
    path = TMUX if os.path.exists(TMUX) else shutil.which("tmux")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is needed (apt-get install tmux): under CI a missing tmux is a failure")
        pytest.skip("tmux is needed (apt-get install tmux)")
    term = Terminal(path, str(tmp_path / "tmux.sock"), str(tmp_path / "exit-status"))
    yield term
    term.close()


class Terminal:
    """One tmux window running one command; every wait polls the screen against a deadline."""

    def __init__(self, tmux: str, socket: str, status: str):
        self.base, self.status = [tmux, "-S", socket], status

    def tmux(self, *args: str, input: str | None = None) -> str:
        r = subprocess.run([*self.base, *args], capture_output=True, text=True, input=input, timeout=30,
                           check=False)
        assert r.returncode == 0, f"tmux {' '.join(args)}: {r.stderr}"
        return r.stdout

    def start(self, argv: list[str]) -> None:
        """Run argv in the window; its exit status goes to a file (tmux's own pane_dead_status
        waits for tmux to reap the process, which it was seen not to do for minutes)."""
        command = f"env OMP_NUM_THREADS=1 {shlex.join(argv)}; echo $? > {shlex.quote(self.status)}"
        self.tmux("new-session", "-d", "-s", "chat", "-x", "160", "-y", "50", command)
        self.tmux("set-option", "-t", "chat", "history-limit", "100000")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30, check=False)

    def screen(self) -> str:
        """Everything the window has shown, scrolled off or not, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat")

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen().splitlines() if line.strip()]

    def wait(self, ready, what: str, timeout: float = REPLY) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                tail = "\n".join(self.lines()[-20:])
                pytest.fail(f"waited {timeout:g}s for {what}; the terminal shows:\n{tail}")
            time.sleep(0.1)

    def at_prompt(self) -> bool:
        lines = self.lines()
        return bool(lines) and lines[-1] == ">"

    def wait_prompt(self, timeout: float = REPLY) -> None:
        self.wait(self.at_prompt, "the prompt", timeout)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "chat", *keys)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "chat", "-l", text)

    def send(self, text: str, timeout: float = REPLY) -> None:
        """Type a line, press Enter and wait until the prompt is back."""
        self.type(text)
        self.wait(lambda: self.lines()[-1].endswith(text), f"{text!r} typed")
        self.keys("Enter")
        self.wait(lambda: self.lines()[-1] != "> " + text and self.at_prompt(), f"the prompt after {text!r}",
                  timeout)

    def paste(self, text: str) -> None:
        """Paste as a terminal does: bracketed (the program asked for it), all at once."""
        self.tmux("load-buffer", "-b", "paste", "-", input=text)
        self.tmux("paste-buffer", "-p", "-d", "-b", "paste", "-t", "chat")

    def exit_status(self) -> int | None:
        """The command's exit status, once it has exited."""
        if not os.path.exists(self.status):
            return None
        with open(self.status) as f:
            text = f.read()
        return int(text) if text.endswith("\n") else None


def slm_chat(model: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "slm", "chat", "--model", model, *flags]


def saved(term: Terminal, path) -> list[dict]:
    """/save the conversation to path and read it back."""
    term.send(f"/save {path}")
    term.wait(lambda: os.path.exists(path), f"{path} to be written")
    with open(path) as f:
        return json.load(f)["messages"]


@pytest.fixture(scope="module")
def short_context(tmp_path_factory, tokenizer_dir) -> str:
    """A tiny random model with a context of 96 tokens: a few exchanges outgrow it."""
    return make_checkpoint(str(tmp_path_factory.mktemp("ctx96")), "llama", tokenizer_dir,
                           max_position_embeddings=96)


@pytest.fixture(scope="module")
def endless(tmp_path_factory, tokenizer_dir) -> str:
    """A tiny random model whose replies do not end: its end tokens (</s>, <|im_end|>) have an
    output row of zeros, so their logit is 0 and greedy decoding always finds a larger one. With a
    context of 32768 tokens and 16000 new at most, a reply runs for seconds: long enough to be stopped by Ctrl-C."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    path = make_checkpoint(str(tmp_path_factory.mktemp("endless")), "llama", tokenizer_dir,
                           max_position_embeddings=32768)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = os.path.join(path, json.load(f)["weight_map"]["lm_head.weight"])
    tensors = load_file(shard)
    for token in ("</s>", "<|im_end|>"):
        tensors["lm_head.weight"][tok.token_to_id(token)] = 0
    save_file(tensors, shard, metadata={"format": "pt"})
    return path


def test_a_session_on_a_terminal(terminal, short_context, tmp_path):
    t = terminal
    t.start(slm_chat(short_context, "--max-new-tokens", "16", "--temperature", "0.7", "--seed", "0"))
    t.wait(lambda: "Chatting with" in t.screen() and t.at_prompt(), "the banner and prompt", FIRST)
    assert "Esc then Enter" in t.screen()

    # a two-line paste is one message, sent by Enter
    t.paste("first line\nsecond line")
    t.wait(lambda: "second line" in t.screen(), "the paste")
    assert not t.at_prompt()  # the paste waits in the line editor: nothing was sent
    t.keys("Enter")
    t.wait(t.at_prompt, "the reply to the paste", FIRST)
    messages = saved(t, tmp_path / "paste.json")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "first line\nsecond line"

    # Esc then Enter starts a new line of the same message
    t.type("one")
    t.keys("Escape", "Enter")
    t.type("two")
    t.wait(lambda: t.lines()[-1].endswith("two"), "the second typed line")
    t.keys("Enter")
    t.wait(t.at_prompt, "the reply to the typed lines")

    # Ctrl-C at the prompt drops the line being typed: what follows is a command, not "junk/save ..."
    t.type("junk")
    t.wait(lambda: t.lines()[-1] == "> junk", "junk typed")
    t.keys("C-c")
    t.wait_prompt()
    messages = saved(t, tmp_path / "typed.json")
    assert messages[-2] == {"role": "user", "content": "one\ntwo"}
    assert messages[-1]["role"] == "assistant"
    assert not any("junk" in m["content"] for m in messages if m["role"] == "user")

    # /save does not replace a file unless told with /save!
    t.send(f"/save {tmp_path / 'paste.json'}")
    assert "exists; /save!" in t.screen()
    assert len(json.loads((tmp_path / "paste.json").read_text())["messages"]) == 2
    t.send(f"/save! {tmp_path / 'paste.json'}")
    assert json.loads((tmp_path / "paste.json").read_text())["messages"] == messages

    # a history longer than the context: the oldest exchanges go, with a note, and the session goes on
    for i in range(12):
        if "outgrew the context of 96 tokens" in t.screen():
            break
        t.send(f"message number {i}")
    assert "outgrew the context of 96 tokens; dropped the oldest" in t.screen()
    t.send("~" * 120)  # a token a character: alone too long for the context, refused in one line, not sent
    assert "slm chat: error: the message is" in t.screen() and "leaves no room in the context of 96" in t.screen()
    t.send("after the note")
    messages = saved(t, tmp_path / "late.json")
    assert messages[0]["content"] != "first line\nsecond line"  # the first exchange was dropped
    assert messages[-2] == {"role": "user", "content": "after the note"}
    assert not any("~" in m["content"] for m in messages)
    assert messages[-1]["role"] == "assistant"

    # /system sets the system prompt, and /reset keeps it
    t.send("/system Answer in one word.")
    t.send("/reset")
    assert saved(t, tmp_path / "reset.json") == [{"role": "system", "content": "Answer in one word."}]

    # Ctrl-D quits, with exit status 0
    t.keys("C-d")
    t.wait(lambda: t.exit_status() is not None, "slm chat to exit")
    assert t.exit_status() == 0


def test_ctrl_c_stops_a_reply_and_keeps_the_session(terminal, endless, tmp_path):
    t = terminal
    t.start(slm_chat(endless, "--max-new-tokens", "16000", "--temperature", "0"))
    t.wait(lambda: "Chatting with" in t.screen() and t.at_prompt(), "the banner and prompt", FIRST)

    def replying(message: str) -> bool:
        """The reply to message has started (text after the message's line) and not ended."""
        lines = t.lines()
        sent = [i for i, line in enumerate(lines) if line == "> " + message]
        return bool(sent) and sent[-1] < len(lines) - 1 and not t.at_prompt()

    for n, message in enumerate(["hello", "again"], start=1):
        t.type(message)
        t.wait(lambda m=message: t.lines()[-1] == "> " + m, f"{message!r} typed")
        t.keys("Enter")
        t.wait(lambda m=message: replying(m), f"the reply to {message!r} to start", FIRST)
        t.keys("C-c")
        t.wait(lambda n=n: t.screen().count("(reply stopped)") == n and t.at_prompt(),
               f"the reply to {message!r} to stop")
    messages = saved(t, tmp_path / "stopped.json")
    assert [(m["role"], m["content"] if m["role"] == "user" else "") for m in messages] == [
        ("user", "hello"), ("assistant", ""), ("user", "again"), ("assistant", "")]
    assert all(m["content"] for m in messages)  # a stopped reply keeps what it said
    assert "outgrew" not in t.screen()

    t.keys("C-d")
    t.wait(lambda: t.exit_status() is not None, "slm chat to exit")
    assert t.exit_status() == 0


@pytest.mark.smollm2
def test_the_default_chat_model_answers_and_ends_its_turn(smollm2_gguf):
    """Piped input: stdout is the reply alone. The reply ends at the model's end-of-turn token,
    far before --max-new-tokens."""
    r = subprocess.run([sys.executable, "-m", "slm", "chat", "--max-new-tokens", "200"], capture_output=True,
                       text=True, input="What is the capital of France?\n", timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "2"}, check=False)
    assert r.returncode == 0, r.stderr
    reply = r.stdout.strip()
    assert "Paris" in reply and "\n" not in reply, reply

    import slm
    from slm.runtime.generate import generate_ids
    from slm.runtime.sampling import Sampling
    lm = slm.load(smollm2_gguf)
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    tokens = [step[0] for step in generate_ids(lm.model, [prompt], 200, Sampling(temperature=0), lm.eos_ids)]
    assert len(tokens) < 200 and lm.tokenizer.decode(tokens[:-1]).strip() == reply
    assert tokens[-1] == lm.tokenizer.token_id("<|im_end|>")  # the end of its turn, not the token budget
