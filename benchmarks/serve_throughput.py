"""Throughput of `slm serve` under concurrent clients: total generated tokens/s with 1, 4 and 16
clients streaming chat completions at once, as ratios to 1 client (same server, same run).

    python benchmarks/serve_throughput.py [--model DIR|FILE.gguf|default] [--clients 1 4 16]
                                          [--requests 3] [--max-tokens 64] [--no-stream]

Without --model: a Llama of the stories15m shape (6 layers, 288 wide, 6 heads) with random fp32
weights and a byte-level BPE trained on 3,000 documents of slm's synthetic corpus (2,861 tokens). `--model default` serves
the real gemma-3-270m. The server is a real `slm serve` process (--max-batch 16); each client sends
--requests requests one after another through the official `openai` client, each with its own
prompt and seed, and the count of generated tokens comes from the server's `usage`.
"""

from __future__ import annotations

import argparse
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
    """stories15m shape, random weights, a BPE trained on the synthetic corpus."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import slm
    from slm.data.synth import iter_documents
    from slm.runtime.tokenizer import train_tokenizer
    tok = train_tokenizer(iter_documents(seed=0, n_docs=3000), vocab_size=4096)
    c = slm.get_config("stories15m")
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_seq_len,
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


def start_server(model: str | None, port: int, max_batch: int, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slm", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--served-model-name", "bench"] + (["--model", model] if model else [])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf ('default': gemma-3-270m)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--no-stream", action="store_true")
    a = ap.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        model = None if a.model == "default" else a.model or build_model(os.path.join(tmp, "stories15m-shape"))
        port = free_port()
        server = start_server(model, port, a.max_batch, os.path.join(tmp, "server.log"))
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
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
