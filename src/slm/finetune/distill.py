"""Training data from a teacher, Orca 2 style: `slm data distill`.

    slm data distill --teacher http://127.0.0.1:8000 --prompts builtin --out distilled.jsonl --strategy step-by-step
    slm data distill --teacher path/to/model --prompts questions.jsonl --out distilled.jsonl

The teacher is a model folder or .gguf file loaded by slm, or any OpenAI-compatible server (`slm
serve`, llama.cpp's server, Ollama, vLLM): POST {URL}/v1/chat/completions. Orca 2's recipe: each
prompt goes to the teacher under a detailed system instruction for a reasoning strategy (think step
by step, recall then answer, ...), and the pair is saved with that instruction replaced by a
generic one ("prompt erasure"), so the student learns to answer that way without being told to.

The output is append-only JSONL, one record per prompt, flushed and fsynced as it is written:
after an interruption (even kill -9) the same command resumes where it stopped. Records carry a
stable id (a hash of strategy and prompt): prompts already done are skipped, repeated prompts are
asked once, and a last line cut off mid-write is detected and dropped before appending.

Prompts: `builtin` (slm's synthetic questions with checkable answers, prompts.py), a .jsonl file
(`prompt`, `question` or `messages` per record; an `answer` is kept and checked), or a .txt
file with one prompt a line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.error
import urllib.request

from tqdm import tqdm

from ..files import output_file, parse_json
from ..runtime.lm import load
from ..runtime.models import KNOWN

from .prompts import builtin_prompts, is_correct
from .sft import jsonl_records

STRATEGIES = {
    "step-by-step": "You are a patient teacher. Solve the problem step by step: write each step of your "
                    "reasoning on its own short line, check the result, and finish with a line of the form "
                    "'The answer is ...'.",
    "direct": "Answer the question directly and correctly in one short sentence, without explanation.",
    "explain": "Answer the question correctly, then explain in one or two simple sentences why that is the "
               "answer, as you would to a curious child.",
    "recall-then-answer": "First recall the facts or rules that the question needs and state them briefly. "
                          "Then use them to answer the question, and finish with 'The answer is ...'.",
}
GENERIC_SYSTEM = "You are a helpful assistant."


# -- prompts -----------------------------------------------------------------------------------
def read_prompts(spec: str, n_builtin: int = 500, seed: int = 0) -> list[dict]:
    """Items with a `prompt` (and optionally `answer`, `kind`, ...) from `builtin` or a file."""
    if spec == "builtin":
        if isinstance(n_builtin, bool) or not isinstance(n_builtin, int) or n_builtin <= 0:
            raise ValueError(f"--n-prompts must be a positive integer, got {n_builtin!r}")
        return builtin_prompts(n_builtin, seed)
    if os.path.isdir(spec):
        raise ValueError(f"--prompts {spec} is a folder; give a .jsonl or .txt file (or builtin)")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"{spec}: no such prompts file (or use --prompts builtin)")
    if not spec.endswith((".jsonl", ".json")):
        with open(spec, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{spec}: not UTF-8 ({e.reason} at byte {e.start})") from None
        items = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
        if not items:
            raise ValueError(f"{spec}: no prompts")
        return items
    items = []
    for i, rec in jsonl_records(spec):
        prompt = rec.get("prompt", rec.get("question")) if isinstance(rec, dict) else None
        if prompt is None and isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            users = [m.get("content") for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            prompt = users[0] if users else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{spec}:{i}: needs a non-empty 'prompt', 'question' or user message")
        items.append({**{k: v for k, v in rec.items() if k not in ("question", "messages")}, "prompt": prompt})
    if not items:
        raise ValueError(f"{spec}: no prompts")
    return items


def record_id(prompt: str, strategy: str) -> str:
    """Stable across runs: whitespace-normalised prompt and the strategy."""
    key = strategy + "\0" + " ".join(prompt.split())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


# -- the output file ---------------------------------------------------------------------------
def recover(path: str) -> set[str]:
    """Ids of the records in `path`. Each record is written as one line ending in a newline, so
    only text after the last newline can be a record cut off mid-write: it is removed from the file."""
    if not os.path.exists(path):
        return set()
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a folder; give a .jsonl file")
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    done = set()
    for i, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            done.add(parse_json(line, f"{path}:{i}")["id"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{i}: not a record written by slm data distill") from None
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    return done


def _append(f, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# -- teachers ----------------------------------------------------------------------------------
class LocalTeacher:
    """A model loaded by slm, replying through its chat template."""

    def __init__(self, path: str, quantize: str | None = None):
        self.lm = load(path, quantize=quantize)
        self.name = os.path.basename(os.path.normpath(path))

    def __call__(self, messages: list[dict], max_tokens: int, temperature: float) -> str:
        return self.lm.chat(messages, max_new_tokens=max_tokens, temperature=temperature)


class HTTPTeacher:
    """An OpenAI-compatible server: the official `openai` client if installed, else urllib."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600):
        base = url.rstrip("/")
        self.base = base[:-3] if base.endswith("/v1") else base
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("SLM_API_KEY") or "none"
        self.timeout = timeout
        try:
            import openai
            self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=self.api_key, timeout=timeout, max_retries=2)
        except ImportError:
            self.client = None
        self.name = model or self._first_model()

    def _first_model(self) -> str:
        if self.client is not None:
            import openai
            try:
                models = [m.id for m in self.client.models.list().data]
            except openai.APIError as e:
                raise ValueError(f"{self.base}/v1/models: {e} (is the server running?)") from None
        else:
            models = [m["id"] for m in self._request("GET", "/v1/models")["data"]]
        if not models:
            raise ValueError(f"{self.base}: serves no models; pass --model NAME")
        return models[0]

    def _request(self, method: str, route: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(self.base + route, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ValueError(f"{self.base}{route}: HTTP {e.code}: {e.read()[:500].decode(errors='replace')}") from None
        except urllib.error.URLError as e:
            raise ValueError(f"{self.base}{route}: {e.reason} (is the server running?)") from None

    def __call__(self, messages: list[dict], max_tokens: int, temperature: float) -> str:
        if self.client is not None:
            import openai
            try:
                r = self.client.chat.completions.create(model=self.name, messages=messages, max_tokens=max_tokens,
                                                        temperature=temperature)
            except openai.APIError as e:  # connection refused, 4xx/5xx: one line, not a traceback
                raise ValueError(f"{self.base}/v1/chat/completions: {e}") from None
            return r.choices[0].message.content or ""
        r = self._request("POST", "/v1/chat/completions", {"model": self.name, "messages": messages,
                                                           "max_tokens": max_tokens, "temperature": temperature})
        return r["choices"][0]["message"]["content"] or ""


def make_teacher(spec: str, model: str | None = None, api_key: str | None = None, quantize: str | None = None):
    if spec.startswith(("http://", "https://")):
        return HTTPTeacher(spec, model, api_key)
    if spec in KNOWN and not os.path.exists(spec):
        return LocalTeacher(spec, quantize)  # a name of `slm models`: slm.load finds its file
    if not os.path.exists(spec):
        raise FileNotFoundError(f"{spec}: no such model folder or file (or give an http:// URL)")
    return LocalTeacher(spec, quantize)


def check_options(out: str, strategy: str, max_tokens: int, temperature: float, limit: int | None) -> None:
    """The checks of distill's arguments, for a command to make before it loads the teacher."""
    output_file(out, "--out")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"--max-tokens must be a positive integer, got {max_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {temperature!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"--limit must be a positive integer, got {limit!r}")


# -- the run -----------------------------------------------------------------------------------
def distill(teacher, items: list[dict], out: str, strategy: str = "step-by-step", max_tokens: int = 256,
            temperature: float = 0.0, limit: int | None = None, progress: bool = True) -> dict:
    """Ask the teacher every prompt not yet in `out` and append one record per reply:
    {"id", "messages": [generic system, user, assistant], "strategy", "teacher", and for a prompt
    with a known answer "answer" and "correct"}. limit: stop after that many new records."""
    check_options(out, strategy, max_tokens, temperature, limit)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    done = recover(out)
    todo, seen, duplicates = [], set(), 0
    for item in items:
        rid = record_id(item["prompt"], strategy)
        if rid in seen:  # the same prompt again in the input
            duplicates += 1
            continue
        seen.add(rid)
        if rid not in done:
            todo.append((rid, item))
    if limit is not None:
        todo = todo[:limit]
    stats = {"already_done": len(done), "duplicates": duplicates, "written": 0, "empty": 0, "correct": 0, "checked": 0}
    with open(out, "a", encoding="utf-8") as f:
        for rid, item in tqdm(todo, desc="distilling", unit="prompt", disable=not progress):
            ask = [{"role": "system", "content": STRATEGIES[strategy]}, {"role": "user", "content": item["prompt"]}]
            reply = teacher(ask, max_tokens, temperature).strip()
            if not reply:
                stats["empty"] += 1  # not written: asked again on the next run
                continue
            record = {"id": rid, "messages": [{"role": "system", "content": GENERIC_SYSTEM},
                                              {"role": "user", "content": item["prompt"]},
                                              {"role": "assistant", "content": reply}],
                      "strategy": strategy, "teacher": teacher.name}
            ok = is_correct(item, reply)
            if ok is not None:
                record.update(answer=item["answer"], correct=ok)
                stats["checked"] += 1
                stats["correct"] += ok
            _append(f, record)
            stats["written"] += 1
    return stats
