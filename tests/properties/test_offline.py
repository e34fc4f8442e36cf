"""Offline by construction: the guard installed by conftest.py (tests/support/offline_guard.py) refuses
every non-loopback connection and name lookup, in the test process and in every Python process a
test starts; training, generation, evaluation, serving and export all pass under it without even
trying the network; and slm's source holds no network client, telemetry or update check."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from support import offline_guard
from support.models import build_tokenizer, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFUSED = "slm offline guard: refused"


def test_guard_refuses_non_loopback_in_process():
    for addr in [("93.184.216.34", 80), ("2606:2800:220:1:248:1893:25c8:1946", 443), ("10.1.2.3", 22)]:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s, pytest.raises(offline_guard.OfflineError):
            s.connect(addr)
        with socket.socket(family, socket.SOCK_STREAM) as s, pytest.raises(offline_guard.OfflineError):
            s.connect_ex(addr)
    with pytest.raises(offline_guard.OfflineError):
        socket.create_connection(("1.1.1.1", 53), timeout=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(offline_guard.OfflineError):
        s.sendto(b"x", ("8.8.8.8", 53))  # a DNS query by hand
    with pytest.raises(socket.gaierror, match="offline guard"):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen("https://huggingface.co/api/models", timeout=2)


def test_guard_lets_loopback_through():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        threading.Thread(target=lambda: server.accept()[0].sendall(b"hi"), daemon=True).start()
        with socket.create_connection(("localhost", port), timeout=5) as c:
            assert c.recv(2) == b"hi"


def test_guard_is_active_in_subprocesses():
    code = ("import socket\n"
            "try:\n    socket.create_connection(('93.184.216.34', 80), timeout=2)\nexcept ConnectionRefusedError as e:\n"
            "    print('refused:', e)\n"
            "try:\n    socket.getaddrinfo('pypi.org', 443)\nexcept socket.gaierror as e:\n    print('no lookup:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "refused: offline guard" in r.stdout and "no lookup: [Errno" in r.stdout, r.stdout
    assert REFUSED in r.stderr


@pytest.mark.slow
def test_train_generate_eval_export_serve_offline(tmp_path, prepared):
    """Each `slm` command runs in its own process under the guard and never tries the network."""
    data, tok = prepared
    run_dir, text = str(tmp_path / "run"), tmp_path / "t.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside.\n" * 8)

    def slm(*args, timeout=300):
        r = subprocess.run([sys.executable, "-m", "slm", *args], capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"slm {args[0]} failed:\n{r.stderr[-3000:]}"
        assert REFUSED not in r.stderr, f"slm {args[0]} tried the network:\n{r.stderr[-3000:]}"
        return r

    slm("train", "--out", run_dir, "--data", data, "--tokenizer", tok, "--dim", "32", "--layers", "1", "--heads", "2",
        "--mlp", "64", "--seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--warmup", "1", "--eval-every", "2",
        "--save-every", "2", "--optimizer", "adamw")
    assert slm("generate", "--model", run_dir, "--prompt", "Once upon", "--max-new-tokens", "8",
               "--temperature", "0").stdout.strip()
    slm("eval", "--model", run_dir, "--text", str(text))
    slm("export", "--model", run_dir, "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    slm("export", "--model", run_dir, "--format", "hf", "--out", str(tmp_path / "hf"))
    assert os.path.getsize(tmp_path / "m.gguf") > 0 and os.path.exists(tmp_path / "hf" / "config.json")

    from support.server import Server  # a real `slm serve` process, asked through the openai client (in this process)
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), "llama", _tokenizer(tmp_path))
    server = Server(ckpt, str(tmp_path / "serve.log"), "--context", "128")
    try:
        reply = server.client().chat.completions.create(
            model="ckpt", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()
    assert REFUSED not in server.log()


def _tokenizer(tmp_path) -> str:
    path = str(tmp_path / "tok")
    build_tokenizer(path)
    return path


NETWORK_IMPORT = re.compile(r"^\s*(?:import|from)\s+(requests|urllib3?|http\.client|httpx|aiohttp|socket|ftplib|"
                            r"smtplib|huggingface_hub|wandb|sentry_sdk|posthog|mixpanel|segment)\b", re.M)
NETWORK_CALL = re.compile(r"hf_hub_download|snapshot_download|urlopen|create_connection|requests\.(?:get|post)|"
                          r"check_for_update|telemetry", re.I)


# Network use that the user asks for by naming the address: nothing else may open a connection.
ALLOWED = {"src/slm/finetune/distill.py": "`slm data distill --teacher URL`: the OpenAI-compatible server named",
           "src/slm/serve/app.py": "`slm serve`: binds the address and port the user names (--host/--port); "
                                   "no outgoing connection"}


def test_no_network_client_telemetry_or_update_check_in_the_source():
    offenders = []
    for root, _, files in os.walk(os.path.join(ROOT, "src", "slm")):
        for name in files:
            if name.endswith(".py") and os.path.relpath(os.path.join(root, name), ROOT) not in ALLOWED:
                path = os.path.join(root, name)
                src = open(path, encoding="utf-8").read()
                for m in list(NETWORK_IMPORT.finditer(src)) + list(NETWORK_CALL.finditer(src)):
                    line = src[:m.start()].count("\n") + 1
                    text = src.splitlines()[line - 1]
                    if text.lstrip().startswith("#") or "OFFLINE_ENV" in text or "TELEMETRY" in text:
                        continue  # comments, and the switches that turn them off
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{line}: {text.strip()}")
    assert not offenders, "network code in slm:\n" + "\n".join(offenders)
    from slm.cli import OFFLINE_ENV
    assert OFFLINE_ENV["HF_HUB_OFFLINE"] == "1" and OFFLINE_ENV["HF_HUB_DISABLE_TELEMETRY"] == "1"
    code = "import os, sys; from slm.cli import main; sys.argv = ['slm', 'info', '--preset', 'slm-1m']; main(); " \
           "print([os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'HF_HUB_DISABLE_TELEMETRY', 'DO_NOT_TRACK')])"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "['1', '1', '1']" in r.stdout, r.stderr
