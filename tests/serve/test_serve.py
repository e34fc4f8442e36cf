"""`slm serve` as a real process on a tiny model, driven by the official `openai` client: the API
gives what `LM` gives in-process, bad input gets its 4xx while the server keeps serving, a client
that goes away stops costing compute, 32 concurrent streams come back right with bounded memory,
the API key and loopback rules hold, and the chat page streams a reply in headless Chromium."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import slm
from support.models import chromium, make_checkpoint
from support.server import Server

CONTEXT = 2048


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> str:
    # a long rope table, so that a long generation outlasts the disconnect test's checks
    return make_checkpoint(str(tmp_path_factory.mktemp("serve") / "tiny"), "llama", tokenizer_dir,
                           max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def lm(model_dir):
    return slm.load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, str(tmp_path_factory.mktemp("log") / "server.log"), "--max-batch", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = server.health()
    assert h["status"] == "ok" and h["max_batch"] == 8 and h["context"] == CONTEXT


def test_completion_streamed_and_not(client, lm):
    prompt = "Once upon a time"
    expected = lm.generate(prompt, max_new_tokens=20, temperature=0)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    n_prompt = len(lm.tokenizer.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 20, n_prompt + 20)
    # Tokens that pile up while the server's event loop waits for a core come merged in one event:
    # on a busy host all 20 may, so a stream in one piece is tried again (up to 3 times).
    for attempt in range(3):
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(texts) == expected and chunks[-1].usage.completion_tokens == 20
        if len([t for t in texts if t]) > 1:
            break
    assert len([t for t in texts if t]) > 1, "the text came in one piece in 3 streams"
    # token-id prompts and several prompts at once
    ids = lm.tokenizer.encode(prompt)
    want = [lm.generate(prompt, max_new_tokens=8, temperature=0), lm.generate("The cat", max_new_tokens=8, temperature=0)]
    for prompts in ([ids, lm.tokenizer.encode("The cat")], [prompt, "The cat"]):
        r = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0)
        assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want


def test_chat_streamed_and_not(client, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Lily."}]
    expected = lm.chat(messages, max_new_tokens=24, temperature=0)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode_chat(messages)) and r.usage.completion_tokens == 24
    stream = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=24, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequences(client, lm):
    full = lm.generate("Once upon a time", max_new_tokens=30, temperature=0)
    k = next(k for k in range(5, len(full) - 3) if full.index(full[k:k + 3]) == k)  # a first occurrence
    for stop in (full[k:k + 3], ["zzzz", full[k:k + 3]]):
        r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0, stop=stop)
        assert r.choices[0].text == full[:k] and r.choices[0].finish_reason == "stop"
        chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30,
                                                temperature=0, stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full[:k]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducibility(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=20, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=3, n=2, **kw)
    b = client.chat.completions.create(seed=3, n=2, **kw)
    c = client.chat.completions.create(seed=4, n=2, **kw)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert texts(a) == texts(b) and len(texts(a)) == 2
    assert texts(a)[0] != texts(a)[1] and texts(c) != texts(a)


def reference_logprobs(lm, ids: list[int], n: int, k: int):
    """Greedy tokens with log_softmax of the model's logits, from full forward passes."""
    out, ids = [], list(ids)
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(lm.model(torch.tensor([ids]))[0, -1].float(), -1)
            top = logp.topk(k)
            t = int(top.indices[0])
            out.append((t, float(logp[t]), top.indices.tolist(), top.values.tolist()))
            ids.append(t)
    return out


def test_logprobs_match_the_model(client, lm):
    tok = lambda i: lm.tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
    messages = [{"role": "user", "content": "The dog was happy"}]
    ref = reference_logprobs(lm, lm.tokenizer.encode_chat(messages), 8, 3)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for got, (t, lp, top_ids, top_lps) in zip(content, ref):
        assert got.token == tok(t) and abs(got.logprob - lp) < 1e-4
        assert [x.token for x in got.top_logprobs] == [tok(i) for i in top_ids]
        assert max(abs(x.logprob - v) for x, v in zip(got.top_logprobs, top_lps)) < 1e-4
        assert bytes(got.bytes) == got.token.encode()
    ref = reference_logprobs(lm, lm.tokenizer.encode("Once upon"), 5, 2)
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok(t) for t, *_ in ref]
    assert max(abs(a - b[1]) for a, b in zip(lp.token_logprobs, ref)) < 1e-4
    assert [len(x) for x in lp.top_logprobs] == [len(set(tok(i) for i in b[2])) for b in ref]
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == r.choices[0].text


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server, client):
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}])
    bad = [  # (what, kwargs for chat.completions.create, expected status)
        ("prompt plus max_tokens beyond the context", dict(max_tokens=CONTEXT), 400),
        ("prompt alone beyond the context", dict(messages=[{"role": "user", "content": "apple " * CONTEXT}]), 400),
        ("absurd max_tokens", dict(max_tokens=10**15), 400),
        ("negative max_tokens", dict(max_tokens=-5), 400),
        ("negative temperature", dict(temperature=-1), 400),
        ("temperature above 2", dict(temperature=7), 400),
        ("top_p 0", dict(top_p=0), 400),
        ("n 0", dict(n=0), 400),
        ("n too large", dict(n=1000), 400),
        ("top_logprobs too large", dict(logprobs=True, top_logprobs=500), 400),
        ("penalty out of range", dict(presence_penalty=9), 400),
        ("too many stop strings", dict(stop=[str(i) for i in range(50)]), 400),
        ("empty messages", dict(messages=[]), 400),
        ("unknown role", dict(messages=[{"role": "wizard", "content": "hi"}]), 400),
        ("logit_bias for a token that does not exist", dict(logit_bias={"999999": 5}), 400),
        ("a seed that is not a number", dict(extra_body={"seed": "abc"}), 400),
        ("unknown model", dict(model="gpt-4o"), 404),
    ]
    for what, kw, status in bad:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(**{**chat, **kw})
        assert e.value.status_code == status, what
        assert e.value.body["message"] and e.value.body["type"], what  # OpenAI's error shape
    raw = [  # (what, method, path, body, headers, expected status)
        ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', {}, 400),
        ("not an object", "POST", "/v1/completions", b'[1, 2]', {}, 400),
        ("missing prompt", "POST", "/v1/completions", b'{"model": "tiny"}', {}, 400),
        ("oversized body", "POST", "/v1/completions",
         json.dumps({"model": "tiny", "prompt": "a" * (3 << 20)}).encode(), {}, 413),
        ("unknown route", "GET", "/v1/nothing", None, {}, 404),
        ("wrong method", "GET", "/v1/chat/completions", None, {}, 405),
        ("foreign Host header (DNS rebinding)", "GET", "/v1/models", None, {"Host": "evil.example:8000"}, 400),
    ]
    for what, method, path, body, headers, status in raw:
        got, data = server.request(method, path, body, headers)
        assert got == status, what
        assert json.loads(data)["error"]["message"], what
    r = client.chat.completions.create(**chat, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and server.health()["status"] == "ok"


def wait_idle(server, timeout=10.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = server.health()
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"still busy: {server.health()}")


def test_disconnected_clients_stop_consuming_compute(server):
    body = json.dumps({"model": "tiny", "prompt": "Once upon a time", "max_tokens": CONTEXT - 20,
                       "temperature": 0, "stream": True}).encode()
    before = wait_idle(server)["generated_tokens"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    after = wait_idle(server)["generated_tokens"]
    assert after - before < CONTEXT - 20  # stopped early
    time.sleep(0.3)
    assert server.health()["generated_tokens"] == after  # and stays stopped
    # the same without streaming: the client gives up while the reply is being generated
    body = body.replace(b'"stream": true', b'"stream": false')
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 5
    while server.health()["running"] == 0:
        assert time.time() < deadline, "the request did not start"
        time.sleep(0.01)
    s.close()
    assert wait_idle(server)["generated_tokens"] - after < CONTEXT - 20


def test_32_concurrent_streamed_chats(server, client, lm):
    """More clients than rows (8): they queue, join the batch as rows free up, and each gets
    exactly its greedy reply alone; the server's memory does not grow from one wave to the next."""
    import psutil
    proc = psutil.Process(server.proc.pid)
    prompts = [[{"role": "user", "content": f"Story number {i} about a cat and {i % 5} dogs."}] for i in range(32)]
    lengths = [8 + (i * 7) % 25 for i in range(32)]
    expected = [lm.chat(m, max_new_tokens=n, temperature=0) for m, n in zip(prompts, lengths)]

    def one(i):
        stream = client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=lengths[i],
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    rss = []
    for wave in range(2):
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(one, range(32)))
        assert got == expected
        rss.append(proc.memory_info().rss)
    h = wait_idle(server)
    assert h["peak_running"] == 8  # every row was busy at once: requests were batched
    assert rss[1] - rss[0] < 20e6, f"memory grew by {(rss[1] - rss[0]) / 1e6:.1f} MB between waves"


def test_prompts_and_outputs_are_not_logged(server, client):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "secret-marker-4711"}],
                                   max_tokens=3)
    log = server.log()
    assert "completion tokens" in log and "secret-marker-4711" not in log


def test_api_key_and_log_prompts(model_dir, tmp_path):
    s = Server(model_dir, str(tmp_path / "server.log"), "--api-key", "k3y", "--log-prompts")
    try:
        for key in ("none", "k3y-wrong"):
            with pytest.raises(openai.AuthenticationError):
                s.client(api_key=key).models.list()
        assert s.request("GET", "/v1/models")[0] == 401
        r = s.client(api_key="k3y").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "marker-0815"}], max_tokens=3)
        assert r.choices[0].message.content is not None
        assert s.health()["status"] == "ok"  # the health check needs no key
    finally:
        s.stop()
    assert "marker-0815" in s.log()  # asked for with --log-prompts


def test_refuses_a_public_address_without_a_key(model_dir):
    r = subprocess.run([sys.executable, "-m", "slm", "serve", "--model", model_dir, "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "SLM_API_KEY": ""})
    assert r.returncode == 1 and "without an API key" in r.stderr


# -- the chat page in headless Chromium --------------------------------------------------------
def test_chat_page_streams_a_reply(server, lm, tmp_path):
    browser_path = chromium()
    from playwright.sync_api import sync_playwright
    message = "Hello, who are you?"
    expected = lm.chat([{"role": "user", "content": message}], max_new_tokens=30, temperature=0)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(server.url + "/")
            # (locators, not wait_for_function: the page's Content-Security-Policy forbids eval)
            page.locator("#model", has_text="tiny").wait_for()
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "30")
            # record every partial reply the page shows, to see the reply arrive in pieces: each
            # update replaces the bubble's text node, and the mutation records keep the replaced
            # ones (read from the records: several updates can land before one observer callback)
            page.evaluate("""() => { window.partials = [];
                new MutationObserver((records) => {
                    for (const r of records) {
                        if (r.target.classList && r.target.classList.contains('assistant'))
                            for (const n of r.removedNodes) window.partials.push(n.textContent);
                    }
                    const m = document.querySelector('.assistant');
                    if (m) window.partials.push(m.textContent); })
                .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
            page.fill("#input", message)
            page.press("#input", "Enter")
            page.locator("#status", has_text=re.compile("^done")).wait_for(timeout=30000)
            assert page.inner_text(".user") == message
            assert page.text_content(".assistant") == expected
            partials = page.evaluate("window.partials")
            assert len(set(partials)) > 2 and all(expected.startswith(x) for x in partials if x)
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 5000 and shot.read_bytes()[:4] == b"\x89PNG"
            if os.environ.get("SLM_SCREENSHOT"):
                shutil.copy(shot, os.environ["SLM_SCREENSHOT"])
        finally:
            browser.close()


def test_chat_page_json_tools_and_failed_turns(server, tmp_path):
    """The page's JSON switch asks for response_format json_object; with tools offered and the
    model made to call one, the call shows as it streams and the next message goes back as the
    tool's result; a turn the server refused (a message longer than the context) stays out of the
    history; max tokens at or above the context leaves the length to the server."""
    browser_path = chromium()
    from playwright.sync_api import sync_playwright
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 12}}}}}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            sent = []  # the JSON bodies the page posted
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
            page.goto(server.url + "/")
            page.locator("#model", has_text="tiny").wait_for()
            assert page.get_attribute("#max-tokens", "max") == str(CONTEXT)
            page.fill("#temperature", "0")

            def turn(text, status=re.compile("^(done|error)")):
                n = page.locator(".msg").count()
                page.fill("#input", text)
                page.press("#input", "Enter")
                page.locator(".msg").nth(n).wait_for()
                page.locator("#status", has_text=status).wait_for(timeout=30000)
                return sent[-1]

            page.fill("#max-tokens", "60")
            page.check("#json")
            body = turn("Describe a cat as JSON.")
            assert body["response_format"] == {"type": "json_object"} and body["max_tokens"] == 60
            assert page.locator(".assistant").last.text_content().lstrip().startswith("{")
            page.uncheck("#json")

            page.fill("#input", "x" * (16 * CONTEXT + 10))  # more than the server takes: a 400
            page.press("#input", "Enter")
            page.locator(".error").wait_for(timeout=30000)
            assert page.locator(".user.failed").count() == 1

            page.click("#tools-box summary")
            page.fill("#tools", json.dumps([tool]))
            page.select_option("#tool-choice", "required")
            page.fill("#max-tokens", "100000")  # more than the context: the server's room
            body = turn("What is the weather in Paris?")
            assert "max_tokens" not in body and body["tool_choice"] == "required" and body["tools"] == [tool]
            assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]  # not the failed turn
            shown = page.locator(".tool-call").last.text_content()
            assert shown.startswith("\N{WRENCH} get_weather({") and json.loads(shown[len("\N{WRENCH} get_weather("):-1])
            page.select_option("#tool-choice", "none")
            page.fill("#max-tokens", "30")
            body = turn('{"celsius": 21}')
            (call,) = body["messages"][-2]["tool_calls"]
            assert body["messages"][-1] == {"role": "tool", "tool_call_id": call["id"], "content": '{"celsius": 21}'}
            assert call["function"]["name"] == "get_weather" and page.locator(".tool").count() == 1
            shot = tmp_path / "chat-tools.png"
            page.screenshot(path=str(shot))
            assert shot.read_bytes()[:4] == b"\x89PNG"
        finally:
            browser.close()
