"""Property-based fuzz of `slm serve`'s HTTP API (Hypothesis) against a real server process on a
tiny model: 1,000+ requests built from valid bodies with fields replaced by wild values, random
JSON, broken bytes, odd methods, paths and headers. Never a 5xx, never a crash; meanwhile threads
of valid traffic through the openai client all complete; the server's RSS ends within 10% of where
it started, besides what its prefix cache keeps on purpose: the valid requests' finished sequences, within the
cache's budget (13-19 MB in runs here, 370-520 entries: by itself most of the 10%)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.models import make_checkpoint
from support.server import Server

pytestmark = pytest.mark.slow
N_REQUESTS = 1000
CONTEXT = 96

wild = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["\ud800", "x\udfff", "\udc80\ud83d", "ok\ud83d\ude00"]),  # lone surrogates (and a valid pair)
    st.lists(st.integers(min_value=-5, max_value=1000), max_size=6), st.lists(st.text(max_size=5), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                          max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", ""]) | wild,
                                 "content": st.text(max_size=60) | wild | st.lists(
                                     st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                            "text": st.text(max_size=20) | wild}), max_size=3)})
COMMON = {
    "model": st.sampled_from(["tiny", "other"]) | wild,
    "max_tokens": st.integers(min_value=1, max_value=12) | wild,
    "temperature": st.floats(min_value=0, max_value=2) | wild,
    "top_p": st.floats(min_value=0.01, max_value=1) | wild,
    "n": st.integers(min_value=1, max_value=3) | wild,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=10) | wild,
    "seed": st.integers(min_value=0, max_value=2**64) | wild,
    "presence_penalty": st.floats(min_value=-2, max_value=2) | wild,
    "frequency_penalty": st.floats(min_value=-2, max_value=2) | wild,
    "logit_bias": st.dictionaries(st.integers(min_value=-10, max_value=500).map(str), st.floats(-100, 100), max_size=3) | wild,
    "stream": st.booleans() | wild,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | wild}) | wild,
}
completion = st.fixed_dictionaries({}, optional={
    **COMMON, "prompt": st.text(max_size=80) | st.lists(st.integers(min_value=-3, max_value=450), max_size=20) | st.lists(
        st.text(max_size=30), max_size=3) | st.lists(st.lists(st.integers(0, 399), max_size=8), max_size=3) | wild,
    "logprobs": st.integers(min_value=0, max_value=6) | wild, "echo": st.booleans() | wild, "suffix": wild,
    "best_of": st.integers(0, 4) | wild})
chat = st.fixed_dictionaries({}, optional={
    **COMMON, "messages": st.lists(message, max_size=4) | wild, "logprobs": st.booleans() | wild,
    "top_logprobs": st.integers(min_value=0, max_value=25) | wild, "max_completion_tokens": st.integers(1, 12) | wild})


VALID = {  # values the API accepts
    "max_tokens": st.integers(min_value=1, max_value=12), "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1), "n": st.integers(min_value=1, max_value=3),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    "seed": st.integers(min_value=0, max_value=2**63), "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "logit_bias": st.dictionaries(st.integers(min_value=0, max_value=399).map(str), st.floats(-100, 100), max_size=3),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
text = st.text(max_size=60) | st.text(st.characters(codec="utf-8"), max_size=20) | st.sampled_from(["\ud800", "a\udfffb"])


@st.composite
def mutated(draw, kind: str):
    """A valid request body with up to two fields replaced by wild values (or dropped)."""
    model = draw(st.sampled_from(["tiny"] * 8 + ["other", "t\udcffiny"]))  # an unknown model, quoted in the 404
    if kind == "completions":
        body = {"model": model, "prompt": draw(text | st.lists(st.integers(0, 399), min_size=1, max_size=20)
                                                | st.lists(text, min_size=1, max_size=3))}
        extra = {"logprobs": st.integers(0, 5), "echo": st.just(False), "best_of": st.integers(1, 3)}
    else:
        body = {"model": model, "messages": draw(st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "developer"]), "content": text}), min_size=1, max_size=4))}
        extra = {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "max_completion_tokens": st.integers(1, 12)}
    fields = {**VALID, **extra}
    for k in draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True)):
        body[k] = draw(fields[k])
    for k in draw(st.lists(st.sampled_from(sorted(body)), max_size=2, unique=True)):
        if draw(st.booleans()):
            body[k] = draw(wild)
        else:
            del body[k]
    return body


def encode(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # NaN/Infinity: not JSON, but Python's parser takes them


body = st.one_of(
    mutated("completions").map(encode), mutated("chat").map(encode), mutated("completions").map(encode),
    mutated("chat").map(encode), completion.map(encode), chat.map(encode), json_value.map(encode),
    st.binary(max_size=200), st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    completion.map(lambda d: encode(d)[:-3]),  # truncated JSON
)
completions_body = mutated("completions").map(encode)
chat_body = mutated("chat").map(encode)
request = st.one_of(  # weighted towards bodies that get past validation, so generation runs too
    st.tuples(st.just("POST"), st.just("/v1/completions"), completions_body),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.just("POST"), st.just("/v1/completions"), completions_body),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.just("POST"), st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body),
    st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
              st.sampled_from(["/v1/models", "/health", "/", "/v1/completions", "/v1/chat/completions"])
              | st.text(alphabet="/abcv1%.?=&#:~-_", max_size=30).map(lambda p: "/" + p)
              | st.text(max_size=10).map(lambda t: "/v1/models/" + urllib.parse.quote(t, safe="")),
              st.binary(max_size=50)),
)
headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=latin-1"]),
    "Accept": st.sampled_from(["*/*", "text/event-stream", "application/json"]),
    "Authorization": st.sampled_from(["Bearer x", "Basic abc", ""]),
})


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_dir):
    model = make_checkpoint(str(tmp_path_factory.mktemp("fuzz") / "tiny"), "llama", tokenizer_dir,
                            max_position_embeddings=CONTEXT)
    s = Server(model, str(tmp_path_factory.mktemp("log") / "server.log"), "--max-batch", "8", "--context", str(CONTEXT))
    yield s
    s.stop()


def send(server, method, path, data, hdrs) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def valid_traffic(server, stop: threading.Event, done: list, failed: list, k: int) -> None:
    client = server.client(timeout=60)
    i = 0
    while not stop.is_set():
        try:
            if i % 2:
                r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Hi {k}.{i}"}],
                                                   max_tokens=8, temperature=0.7, seed=i, stream=bool(i % 4 == 1))
                if i % 4 == 1:
                    r = list(r)
                    assert r and r[-1].choices[0].finish_reason in ("stop", "length")
                else:
                    assert r.choices[0].finish_reason in ("stop", "length")
            else:
                r = client.completions.create(model="tiny", prompt=f"Once upon a time {i}", max_tokens=8, n=2)
                assert len(r.choices) == 2
            done.append(1)
        except Exception as e:  # noqa: BLE001 (any failure of a valid request is a test failure)
            failed.append(repr(e))
        i += 1
        stop.wait(0.05)  # steady traffic, leaving the fuzzer its share of the CPU


def rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def test_fuzz_the_http_api(server):
    for i in range(30):  # warm up: allocator pools, the KV cache rows, every route's code paths
        server.client().completions.create(model="tiny", prompt="warm", max_tokens=8, n=1 + i % 3, stream=bool(i % 2))
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w"}], max_tokens=8)
    before, kept_before = rss(server), server.health()["prefix_cache"]["bytes"]
    stop, done, failed = threading.Event(), [], []
    threads = [threading.Thread(target=valid_traffic, args=(server, stop, done, failed, k), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    tried, statuses, errors = [0], {}, []

    @settings(max_examples=N_REQUESTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(req=request, hdrs=st.just({"Content-Type": "application/json"}) | headers)
    def fuzz(req, hdrs):
        method, path, data = req
        status, payload = send(server, method, path, data if method not in ("GET", "HEAD", "OPTIONS") else None, hdrs)
        tried[0] += 1
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 500 or b'"server_error"' in payload or server.proc.poll() is not None:
            errors.append((method, path, data[:300], status, payload[:300]))
        assert server.proc.poll() is None, "the server died"

    try:
        fuzz()
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    time.sleep(1)
    after, kept = rss(server), server.health()["prefix_cache"]
    grown = kept["bytes"] - kept_before  # finished sequences kept on purpose
    print(f"\nfuzz: {tried[0]} requests, statuses {dict(sorted(statuses.items()))}; concurrent valid requests: "
          f"{len(done)} completed, {len(failed)} failed; server RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, "
          f"of which the prefix cache's growth {grown / 2**20:.1f} MiB ({kept['entries']} entries)")
    assert not errors, f"{len(errors)} requests got a 5xx, e.g. {errors[:3]}"
    assert tried[0] >= N_REQUESTS
    assert not failed and len(done) > 0, failed[:3]
    assert server.health()["status"] == "ok"
    assert kept["bytes"] <= kept["budget_bytes"]
    assert abs(after - grown - before) <= 0.10 * before
