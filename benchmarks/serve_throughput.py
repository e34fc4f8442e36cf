"""Throughput of `slm serve` under concurrent clients: total generated tokens/s with 1, 4 and 16
clients streaming chat completions at once, as ratios to 1 client (same server, same run); then
the "mixed" scenario: short chats streaming while long prompts arrive among them, with each short
chat's time to first token and the gaps between its tokens (p50, p99), against the same chats
without the long prompts; then a chat of --turns turns, each sending the conversation so far, with
each turn's median time to first token over --chats chats (the server's prefix cache keeps earlier
turns' keys and values); --chat-document puts a long document in each chat's first message.

    python benchmarks/serve_throughput.py [--model DIR|FILE.gguf|default] [--clients 1 4 16]
                                          [--requests 3] [--max-tokens 64] [--no-stream]
                                          [--mixed-chats 8] [--long-prompts 2] [--long-tokens 2000]
                                          [--turns 5] [--chats 3] [--chat-document LINES]
                                          [--prefix-cache-mb MB]

Without --model: a Llama of the stories15m shape (6 layers, 288 wide, 6 heads; a 2,048-token
context) with random fp32 weights and a byte-level BPE trained on 3,000 documents of slm's synthetic corpus (2,861 tokens). `--model default` serves
the real gemma-3-270m. The server is a real `slm serve` process (--max-batch 16); each client sends
--requests requests one after another through the official `openai` client, each with its own
prompt and seed, and the count of generated tokens comes from the server's `usage`.

Mixed: --mixed-chats clients each stream --requests chats (--max-tokens tokens, with logprobs, so
that every token is an event) while --long-prompts other clients each send one prompt of
--long-tokens token ids (max_tokens 16), staggered across the run. Reported: time to first token
and inter-token latency (p50, p99) of the short chats, with and without the long prompts, and the
long prompts' own time to first token.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from results_log import record  # noqa: E402


def build_model(out: str) -> str:
    """stories15m shape (with a 2,048-token context, room for the mixed scenario's long prompts),
    random weights, a BPE trained on the synthetic corpus."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import slm
    from slm.data.synth import iter_documents
    from slm.runtime.tokenizer import train_tokenizer
    tok = train_tokenizer(iter_documents(seed=0, n_docs=3000), vocab_size=4096)
    c = slm.get_config("stories15m")
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=c.norm_eps, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, max_batch: int, log_path: str,
                 prefix_cache_mb: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slm", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--served-model-name", "bench"] + (["--model", model] if model else []) + \
        (["--prefix-cache-mb", str(prefix_cache_mb)] if prefix_cache_mb is not None else [])
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"slm serve exited: {open(log_path).read()}")
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("slm serve did not start")


def run_level(client, clients: int, requests: int, max_tokens: int, stream: bool) -> tuple[int, float]:
    def one_client(c: int) -> int:
        tokens = 0
        for r in range(requests):
            kw = dict(model="bench", messages=[{"role": "user", "content": f"Tell story {c}-{r} about a cat."}],
                      max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=1000 * c + r)
            if stream:
                for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                    if chunk.usage is not None:
                        tokens += chunk.usage.completion_tokens
            else:
                tokens += client.chat.completions.create(**kw).usage.completion_tokens
        return tokens

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(one_client, range(clients)))
    return total, time.perf_counter() - t


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def timed_stream(client, kw: dict) -> tuple[float, list[float], int]:
    """(time to first token, gaps between token events, tokens) of one streamed chat (messages in
    kw) or completion. With logprobs every token makes an event, even one that adds no character."""
    t0 = time.perf_counter()
    times, tokens = [], 0
    if "messages" in kw:
        chunks = client.chat.completions.create(stream=True, logprobs=True, **kw)
        count = lambda c: len(c.choices[0].logprobs.content or [])  # noqa: E731
    else:
        chunks = client.completions.create(stream=True, logprobs=0, **kw)
        count = lambda c: len(c.choices[0].logprobs.tokens or [])  # noqa: E731
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].logprobs and count(chunk):
            times.append(time.perf_counter())
            tokens += count(chunk)
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], tokens


def run_mixed(client, chats: int, requests: int, max_tokens: int, long_prompts: int, long_tokens: int,
              vocab: int) -> dict:
    """Short streamed completions from `chats` clients, with `long_prompts` long ones among them."""
    ttft, gaps, long_ttft, tokens = [], [], [], [0]

    def chat_client(c: int) -> None:
        for r in range(requests):
            kw = dict(model="bench", messages=[{"role": "user", "content": f"Tell story {c}-{r} about a cat."}],
                      max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=1000 * c + r)
            t, g, n = timed_stream(client, kw)
            ttft.append(t)
            gaps.extend(g)
            tokens[0] += n

    def long_client(i: int) -> None:
        time.sleep(0.5 + i)  # staggered: they arrive while the chats stream
        ids = [(7 * j + i) % (vocab - 10) + 5 for j in range(long_tokens)]
        t, _, n = timed_stream(client, dict(model="bench", prompt=ids, max_tokens=16, temperature=0))
        long_ttft.append(t)
        tokens[0] += n

    t = time.perf_counter()
    with ThreadPoolExecutor(chats + long_prompts) as pool:
        jobs = [pool.submit(chat_client, c) for c in range(chats)] + \
               [pool.submit(long_client, i) for i in range(long_prompts)]
        for j in jobs:
            j.result()
    secs = time.perf_counter() - t
    out = {"tokens": tokens[0], "seconds": round(secs, 2), "tok_s": round(tokens[0] / secs, 1),
           "ttft_p50_ms": round(1e3 * pct(ttft, 0.5), 1), "ttft_p99_ms": round(1e3 * pct(ttft, 0.99), 1),
           "itl_p50_ms": round(1e3 * pct(gaps, 0.5), 2), "itl_p99_ms": round(1e3 * pct(gaps, 0.99), 2),
           "itl_max_ms": round(1e3 * max(gaps), 1)}
    if long_ttft:
        out["long_ttft_max_ms"] = round(1e3 * max(long_ttft), 1)
    return out


def document(lines: int) -> str:
    """A list of `lines` short facts (~15 tokens each), as a RAG prompt carries."""
    colours = ["red", "blue", "green"]
    return "\n".join(f"Item {i}: the {colours[i % 3]} box holds {i * 7 % 13} stones." for i in range(lines))


def run_turns(client, turns: int, max_tokens: int, chat: int, doc_lines: int = 0) -> list[float]:
    """Chat number `chat` of `turns` turns, each sending the whole conversation so far (as chat
    clients do), the first message with a document of `doc_lines` lines: the time to first token
    of each turn."""
    topics = ["a cat", "the sea", "a small robot", "a garden", "the moon", "a train", "a baker", "winter"]
    messages, ttft = [], []
    for t in range(turns):
        topic = topics[(t + chat) % len(topics)]
        doc = f"Read this list.\n{document(doc_lines)}\n" if doc_lines and t == 0 else ""
        messages.append({"role": "user", "content": f"Chat {chat}: {doc}now tell me a short story about {topic}."})
        t0, first, reply = time.perf_counter(), None, ""
        for chunk in client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                reply += chunk.choices[0].delta.content
        ttft.append(first - t0)
        messages.append({"role": "assistant", "content": reply})
    return ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf ('default': gemma-3-270m)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--mixed-chats", type=int, default=8, help="mixed scenario: clients streaming short chats "
                                                                "(0: skip the scenario)")
    ap.add_argument("--long-prompts", type=int, default=2, help="mixed scenario: long prompts among them")
    ap.add_argument("--long-tokens", type=int, default=2000, help="mixed scenario: tokens of each long prompt")
    ap.add_argument("--turns", type=int, default=5, help="chat scenario: turns of one chat, each sending the "
                                                         "conversation so far (0: skip the scenario)")
    ap.add_argument("--chats", type=int, default=3, help="chat scenario: chats, one after another (the median "
                                                         "of each turn is reported)")
    ap.add_argument("--chat-document", type=int, default=0, metavar="LINES",
                    help="chat scenario: the first message carries a list of LINES facts (~15 tokens each, as a "
                         "RAG prompt), so that every later turn's history holds it")
    ap.add_argument("--prefix-cache-mb", type=int, default=None, help="the server's --prefix-cache-mb "
                                                                      "(default: its own; 0: none)")
    a = ap.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        model = None if a.model == "default" else a.model or build_model(os.path.join(tmp, "stories15m-shape"))
        port = free_port()
        server = start_server(model, port, a.max_batch, os.path.join(tmp, "server.log"), a.prefix_cache_mb)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                   timeout=600)
            run_level(client, 1, 1, 8, not a.no_stream)  # warm up (kernels, allocator)
            print(f"model: {a.model or 'stories15m shape, random weights'}; {a.requests} requests per client, "
                  f"max_tokens {a.max_tokens}, temperature 0.8, {'non-' if a.no_stream else ''}streamed chat, "
                  f"--max-batch {a.max_batch}, torch threads {os.cpu_count()} cpus")
            print(f"{'clients':>8} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'vs 1 client':>12}")
            base = None
            for c in a.clients:
                tokens, secs = run_level(client, c, a.requests, a.max_tokens, not a.no_stream)
                rate = tokens / secs
                base = base or rate
                print(f"{c:>8} {tokens:>8} {secs:>8.2f} {rate:>8.1f} {rate / base:>11.2f}x", flush=True)
                record("serve_throughput", model=a.model or "stories15m shape, random weights",
                       requests_per_client=a.requests, max_tokens=a.max_tokens, max_batch=a.max_batch,
                       stream=not a.no_stream, clients=c, tokens=tokens, seconds=round(secs, 2),
                       tok_s=round(rate, 1), vs_1_client=round(rate / base, 2))
            if a.mixed_chats:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    context = json.load(r)["context"]
                vocab = 256  # long prompts of token ids below 256: inside every vocabulary
                long_tokens = min(a.long_tokens, context - 16)
                print(f"\nmixed: {a.mixed_chats} clients x {a.requests} streamed chats of {a.max_tokens} "
                      f"tokens, with {a.long_prompts} prompts of {long_tokens} tokens among them")
                print(f"{'':>14} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
                      f"{'ITL max':>8} {'long TTFT':>10}")
                rows = {}
                for name, longs in (("chats alone", 0), ("with long", a.long_prompts)):
                    m = rows[name] = run_mixed(client, a.mixed_chats, a.requests, a.max_tokens, longs, long_tokens,
                                               vocab)
                    print(f"{name:>14} {m['tok_s']:>7.1f} {m['ttft_p50_ms']:>7.1f}ms {m['ttft_p99_ms']:>7.1f}ms "
                          f"{m['itl_p50_ms']:>6.2f}ms {m['itl_p99_ms']:>6.2f}ms {m['itl_max_ms']:>6.1f}ms "
                          f"{str(m.get('long_ttft_max_ms', '-')) + ('ms' if longs else ''):>10}", flush=True)
                alone, mixed = rows["chats alone"], rows["with long"]
                record("serve_throughput", scenario="mixed", model=a.model or "stories15m shape, random weights",
                       max_batch=a.max_batch, chats=a.mixed_chats, requests_per_chat=a.requests,
                       max_tokens=a.max_tokens, long_prompts=a.long_prompts, long_tokens=long_tokens,
                       tok_s=mixed["tok_s"], ttft_p50_ms=mixed["ttft_p50_ms"], ttft_p99_ms=mixed["ttft_p99_ms"],
                       itl_p50_ms=mixed["itl_p50_ms"], itl_p99_ms=mixed["itl_p99_ms"], itl_max_ms=mixed["itl_max_ms"],
                       long_ttft_max_ms=mixed["long_ttft_max_ms"], alone_tok_s=alone["tok_s"],
                       alone_ttft_p99_ms=alone["ttft_p99_ms"], alone_itl_p50_ms=alone["itl_p50_ms"],
                       alone_itl_p99_ms=alone["itl_p99_ms"], alone_itl_max_ms=alone["itl_max_ms"],
                       vs_alone_itl_p99=round(mixed["itl_p99_ms"] / alone["itl_p99_ms"], 2))
            if a.turns:
                runs = [run_turns(client, a.turns, a.max_tokens, c, a.chat_document) for c in range(a.chats)]
                ttft = [sorted(r[t] for r in runs)[len(runs) // 2] for t in range(a.turns)]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    cached = json.load(r).get("prefix_cache", {})
                print(f"\nchat: {a.chats} chats of {a.turns} turns, replies of up to {a.max_tokens} tokens, "
                      f"a document of {a.chat_document} lines in the first message "
                      f"(temperature 0); prefix cache {cached.get('budget_bytes', 0) / 2**20:.0f} MiB, "
                      f"{cached.get('hits', 0)} hits, {cached.get('hit_tokens', 0)} tokens reused")
                print("  median time to first token by turn: " + ", ".join(f"{1e3 * t:.0f} ms" for t in ttft) +
                      f"; turn {a.turns} vs turn 1: {ttft[-1] / ttft[0]:.2f}x")
                record("serve_throughput", scenario="chat turns", model=a.model or "stories15m shape, random weights",
                       turns=a.turns, chats=a.chats, max_tokens=a.max_tokens, document_lines=a.chat_document,
                       prefix_cache_mb=round(cached.get("budget_bytes", 0) / 2**20),
                       prefix_hits=cached.get("hits", 0), prefix_hit_tokens=cached.get("hit_tokens", 0),
                       **{f"ttft_turn{i + 1}_ms": round(1e3 * t, 1) for i, t in enumerate(ttft)},
                       last_vs_first=round(ttft[-1] / ttft[0], 2))
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
