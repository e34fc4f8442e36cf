"""`slm serve` against clients that would stall it, as a real process: bad flags are one line before
anything loads, a port in use is one line, --port 0 names the port it bound; oversized text, too
many prompts and too large a logit_bias are 400s; idle connections and half-sent heads and bodies
are closed; and while one client sends a 4,000-token prompt and another 64 prompts, a third
client's stream keeps its pace, /health answers at once, and memory returns to where it was."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

from support.models import make_checkpoint
from support.server import Server

TIMEOUT = 1.0  # --timeout of the server here: the deadline tests wait only this long


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("hardening") / "tiny"), "llama", tokenizer_dir,
                           max_position_embeddings=1024)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, str(tmp_path_factory.mktemp("log") / "server.log"), "--max-batch", "4",
               "--timeout", str(TIMEOUT))
    yield s
    s.stop()


def slm_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slm", "serve", *args], capture_output=True, text=True, timeout=120)


def one_error_line(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    # the line naming the model once it has loaded (`slm: NAME: PRECISION`) is not an error line
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("slm: ")]
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("slm serve: error: "), r.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_flags_are_one_line_before_loading():
    # the model does not exist: each flag must be refused before anything tries to load it
    from concurrent.futures import ThreadPoolExecutor
    cases = [("--port", "99999", ("--port", "65535")), ("--context", "-5", ("--context", "at least 1")),
             ("--max-batch", "0", ("--max-batch", "at least 1")), ("--prefill-chunk", "0", ("--prefill-chunk",)),
             ("--timeout", "nan", ("--timeout",))]
    with ThreadPoolExecutor(len(cases)) as pool:
        runs = list(pool.map(lambda c: slm_serve("--model", "/no/such/model", c[0], c[1]), cases))
    for (flag, value, words), r in zip(cases, runs):
        one_error_line(r, 2, *words)


def test_a_cache_too_large_for_memory_is_one_line(model_dir):
    one_error_line(slm_serve("--model", model_dir, "--max-batch", "100000000"), 1, "KV cache", "--max-batch")


def test_a_port_in_use_is_one_line_and_port_0_names_its_port(server, model_dir):
    r = slm_serve("--model", model_dir, "--port", str(server.port))  # the module's server holds it
    one_error_line(r, 1, "already in use", str(server.port))
    assert "slm serve: tiny at" not in r.stderr  # no banner before the error
    assert f" at http://127.0.0.1:{server.port}/ " in server.log()  # the server started on --port 0


def test_oversized_and_too_many_are_400s(server):
    chat = {"model": "tiny", "max_tokens": 2}
    cases = [  # (what, route, body, words in the message)
        ("text beyond 16 characters a token of the context", "/v1/chat/completions",
         {**chat, "messages": [{"role": "user", "content": "a" * (16 * 1024 + 1)}]}, "16384"),
        ("a prompt beyond it", "/v1/completions", {**chat, "prompt": ["hi", "b" * (16 * 1024 + 1)]}, "16384"),
        ("300 prompts (a 400 on an idle server, not 'busy')", "/v1/completions",
         {**chat, "prompt": ["hi"] * 300}, "at most 128 prompts"),
        ("301 logit_bias entries", "/v1/completions", {**chat, "prompt": "hi",
                                                        "logit_bias": {str(i): 1 for i in range(301)}}, "at most 300"),
    ]
    for what, route, body, words in cases:
        status, data = server.request("POST", route, json.dumps(body).encode())
        assert status == 400, what
        assert words in json.loads(data)["error"]["message"], what
    # at the limits, they are served
    for body in ({**chat, "prompt": ["hi"] * 128}, {**chat, "prompt": "hi", "logit_bias": {str(i): 1 for i in range(300)}}):
        status, data = server.request("POST", "/v1/completions", json.dumps(body).encode())
        assert status == 200, data


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends before it closes the connection; fails if it is still open after seconds."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        pytest.fail(f"the connection is still open after {seconds} s (got {got[:80]!r})")
    except ConnectionResetError:
        pass
    return got


def test_idle_and_half_sent_connections_are_closed(server):
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        assert closed_within(idle, 5 * TIMEOUT) == b""
    with socket.create_connection(("127.0.0.1", server.port)) as half:
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        assert closed_within(half, 5 * TIMEOUT) == b""
    with socket.create_connection(("127.0.0.1", server.port)) as slow_body:
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"model\":")
        reply = closed_within(slow_body, 5 * TIMEOUT)
        assert reply.startswith(b"HTTP/1.1 408 ") and b"did not arrive" in reply
    # after a complete request, a keep-alive connection that starts the next head and stops
    with socket.create_connection(("127.0.0.1", server.port)) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(4096).startswith(b"HTTP/1.1 200 ")
        kept.sendall(b"GET /hea")
        closed_within(kept, 5 * TIMEOUT)
    assert time.perf_counter() - t < 4 * 3 * TIMEOUT
    assert server.health()["status"] == "ok"


# -- fairness -------------------------------------------------------------------------------------
ROUNDS = 5

def anonymous_rss(pid: int) -> int:
    """Bytes of the process's resident anonymous memory (heap, tensors): what a burst could leave
    behind. The file-backed rest (the code of libtorch and friends, faulted in as new paths first
    run, and evicted again under memory pressure) is not the server's to hold or give back."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))



def stream_gaps(server: Server, n: int) -> list[float]:
    """Seconds between the events of one streamed completion of n tokens (with logprobs, every
    token makes an event, even one that adds no complete character; tokens that pile up while the
    server's event loop is busy come merged in one event, after a longer gap)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = {"model": "deep", "prompt": [5, 17, 42, 9], "max_tokens": n, "temperature": 0, "stream": True,
            "logprobs": 0, "logit_bias": {str(i): -100 for i in range(5)}}  # no special token, no end: n tokens
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    times, tokens = [], 0
    while line := r.readline():
        if line.startswith(b"data: {"):
            times.append(time.perf_counter())
            tokens += len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
    conn.close()
    assert tokens == n
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.slow
def test_a_stream_keeps_its_pace_while_others_send_long_and_many_prompts(tmp_path, tokenizer_dir):
    """A stream's gaps between tokens, while another client sends a 4,000-token prompt and a third
    64 prompts, against its median gap alone (measured just before, in the same server).

    The server runs as users run it (the C++ decoder, one thread) with a model whose step costs a
    few ms, as a real small model's does: 8 layers of 512 in fp32 (~6-8 ms a step here), so that
    the comparison is of the scheduler, not of HTTP's jitter (a 64-wide model steps in 0.6 ms).
    Without chunked prefill the stream would wait for the whole 4,000-token prefill (seconds);
    with it, each of its steps waits for at most a turn of prefill costing about a quarter of a
    step (half while two prompts or more are going in): the whole layers of a chunk that fit in it.

    Measured on the 2-core host, 18 rounds of a copy of this scenario: largest gap 2.2-3.2x the
    median alone (16 under the issue's 3x), 99th percentile 2.1-3.1x; the burst's mean gap is
    ~1.8x (a step of 3 rows costs ~1.3-1.5x one row's, and a turn of prefill half a step beside
    it). Above 3x came when the stream alone stepped fast (5.6-6.0 ms instead of 6.3-7.9). Before
    the copies of a prompt's keys and values went in slices (copy_slices), a prefix-cache hit's
    whole layer (16 MB) went in one turn: 2.2-3.3x, 3.0x or more in 2 of 8 rounds; before the
    finished stream's last token stopped waiting for its prefix-cache save, 3.7-4.9x. A round that
    a busy host spoils is run again, up to ROUNDS times.
    /health answers within 100 ms throughout, and the server's resident anonymous memory
    (anonymous_rss) returns within 10% of where it was before the burst."""
    # The streaming client shares this process with the other clients' threads: with Python's
    # default 5 ms switch interval its reads could wait that long for the interpreter, which the
    # gaps would then count against the server.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    model = make_checkpoint(str(tmp_path / "deep"), "llama", tokenizer_dir, max_position_embeddings=4608,
                            num_hidden_layers=8, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                            num_key_value_heads=8, shard="20MB")
    server = Server(model, str(tmp_path / "server.log"), "--max-batch", "4", "--context", "4608",
                    env={"OMP_NUM_THREADS": "1"})
    try:
        stream_gaps(server, 20)  # warm up (first-call costs)
        rss_before = anonymous_rss(server.proc.pid)
        long_prompt = {"prompt": [5 + i % 390 for i in range(4000)], "max_tokens": 1, "temperature": 0}
        many = {"prompt": [f"Story {i} about a cat" for i in range(64)], "max_tokens": 16, "temperature": 0}
        health = []
        for attempt in range(ROUNDS):  # a shared host can take a core mid-round: the best of a few
            base = statistics.median(stream_gaps(server, 150))
            gaps, stop, statuses = [], threading.Event(), {}

            def poll():
                while not stop.is_set():
                    t = time.perf_counter()
                    assert server.health()["status"] == "ok"
                    health.append(time.perf_counter() - t)
                    time.sleep(0.02)

            def post(name, body):
                statuses[name] = server.request("POST", "/v1/completions", body)[0]

            threads = [threading.Thread(target=lambda: gaps.extend(stream_gaps(server, 400))),
                       threading.Thread(target=poll)]
            for t in threads:
                t.start()
            time.sleep(0.3)  # the stream is running
            # encoded before: the client's own work at the moment they are sent is not the server's
            bodies = {name: json.dumps({"model": "deep", **body}).encode()
                      for name, body in (("long", long_prompt), ("many", many))}
            others = [threading.Thread(target=post, args=(name, body)) for name, body in bodies.items()]
            for t in others:
                t.start()
            for t in others + threads[:1]:
                t.join()
            stop.set()
            threads[1].join()
            assert statuses == {"long": 200, "many": 200}
            assert server.health()["peak_running"] >= 3  # the others ran alongside the stream
            worst, p99 = max(gaps), sorted(gaps)[int(0.99 * len(gaps))]
            if worst < 3 * base and p99 < 3 * base:
                break
        said = (f"alone the median gap is {1e3 * base:.1f} ms; with the others the largest is {1e3 * worst:.1f} ms "
                f"({worst / base:.1f}x), the 99th percentile {1e3 * p99:.1f} ms ({p99 / base:.1f}x)")
        print(said)
        assert worst < 3 * base, said  # a whole 4,000-token prefill in one turn: seconds
        assert p99 < 3 * base, said
        assert max(health) < 0.1, f"/health took {1e3 * max(health):.0f} ms"
        deadline = time.time() + 10
        while server.health()["running"] or server.health()["waiting"]:
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        # What the prefix cache keeps (the finished sequences, within its budget) is memory on
        # purpose, and /health counts it; everything else must have gone back.
        kept = server.health()["prefix_cache"]
        assert 0 < kept["bytes"] <= kept["budget_bytes"]
        rss_after = anonymous_rss(server.proc.pid)
        assert rss_after - kept["bytes"] < 1.1 * rss_before, \
            f"resident anonymous memory {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB, of which the " \
            f"prefix cache holds {kept['bytes'] / 2**20:.0f} MiB"
    finally:
        sys.setswitchinterval(switch)
        server.stop()
