"""`slm serve`: an OpenAI-compatible API and a chat page, for one model, on this machine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (server-sent events with
"stream": true), GET /health, and GET / (the chat page). Requests share the model through the
continuous-batching loop in engine.py.

Privacy and safety: the server binds to 127.0.0.1 unless told otherwise, refuses a non-loopback
address without an API key, checks the Host header on loopback (so a web page cannot reach it by
DNS rebinding), and logs token counts, never prompts or outputs, unless --log-prompts.

One client cannot stall the others: text is bounded before it is tokenized, and tokenized (and chat
templates rendered) in worker threads, never on the event loop; prompts, logit_bias and stop
strings are capped; a connection must send each request's head and body within `timeout` seconds
and is closed when idle that long; the engine prefills long prompts in chunks between decode steps
and lets the API calls take turns for rows.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import gc
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..runtime.adapters import RowAdapters, read_adapter_config
from ..runtime.lm import DEFAULT_MODEL, load
from ..runtime.sampling import OPENAI_DEFAULT_TEMPERATURE
from .engine import PREFILL_CHUNK, PREFIX_CACHE_BYTES, Engine, Params, QueueFull, deltas
from . import tools
from .grammar import GrammarError, grammar_for
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import Metrics
from .engine import Request as EngineRequest

log = logging.getLogger("slm.serve")

MAX_BODY = 2 << 20  # bytes of request JSON
MAX_N = 8  # choices per prompt
MAX_STOP = 8  # stop strings per request
MAX_PROMPTS = 128  # prompts per /v1/completions request
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (OpenAI's limit too)
MAX_GRAMMAR = 64_000  # characters of a GBNF grammar
MAX_TOOLS = 128  # tools offered in one chat request
MAX_EMBED_INPUTS = 2048  # inputs of one /v1/embeddings request (OpenAI's limit too)
# Characters of text per token of the context that a request may send: text beyond this cannot fit
# the context in any real tokenizer (English runs about 4 characters a token), and bounding it
# bounds the tokenizer's work before it starts.
CHARS_PER_TOKEN = 16
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'")


# -- errors in OpenAI's shape ------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII-escaped: a message may quote the client's input, which can hold lone surrogates
        # ("\ud800" in JSON) that UTF-8 cannot encode
        return Response(json.dumps(self.body(), separators=(",", ":")), status_code=self.status,
                        media_type="application/json")


# -- request bodies ----------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not use (user, metadata, ...) are accepted
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # structured outputs (serve/grammar.py): {"type": "json_object"}, or {"type": "json_schema",
    # "json_schema": {"name": ..., "schema": {...}}}; or llama.cpp's GBNF grammar
    response_format: dict | None = None
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (the prompt's logprobs, nothing generated)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None  # an assistant's calls (serve/tools.py)
    tool_call_id: str | None = None  # a tool message: the call it answers


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


class ResponsesRequest(BaseModel):
    """OpenAI's newer /v1/responses, for text in and out (no tools, no stored conversations)."""
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[dict] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"


# -- the app -----------------------------------------------------------------------------------
@dataclass
class ServeConfig:
    """How the server serves (`slm serve`'s flags take their defaults from here)."""
    host: str = "127.0.0.1"  # a non-loopback address needs an API key
    port: int = 8000
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/
    name: str | None = None  # the model id clients send; None: the model's folder or file name
    max_batch: int = 16  # sequences decoded together (KV cache rows)
    context: int | None = 4096  # tokens per sequence, capped by the model's; None: the model's
    log_prompts: bool = False  # log prompts and outputs too, not only token counts
    max_body: int = MAX_BODY  # bytes of request JSON
    prefill_chunk: int = PREFILL_CHUNK  # most prompt tokens per prefill forward (smaller while others decode)
    timeout: float = 10.0  # seconds a client may take to send a request's head, and its body, or stay idle
    prefix_cache_mb: int = PREFIX_CACHE_BYTES // 2**20  # finished sequences kept for prompts that start with one; 0: none
    lora: dict[str, str] = field(default_factory=dict)  # LoRA adapters (PEFT folders) served by name beside the model

    def __post_init__(self):
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be a TCP port number, 0 to 65535 (0: any free port), got {self.port!r}")
        for name in ("max_batch", "max_body", "prefill_chunk") + (("context",) if self.context is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {v!r}")
        if isinstance(self.prefix_cache_mb, bool) or not isinstance(self.prefix_cache_mb, int) or self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be a whole number of at least 0, got {self.prefix_cache_mb!r}")
        for name, folder in self.lora.items():
            if not isinstance(name, str) or not name or name != name.strip() or "/" in name:
                raise ValueError(f"an adapter's name must be a non-empty word without '/', got {name!r}")
            if not isinstance(folder, str) or not folder:
                raise ValueError(f"the adapter {name!r} needs a folder")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or \
                not math.isfinite(self.timeout) or self.timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")


def check_adapters(lora: dict[str, str], model_name: str) -> None:
    """What can be checked of the adapters before the model loads: their names and configs."""
    for name, folder in lora.items():
        if name == model_name:
            raise ValueError(f"the adapter name {name!r} is the served model's own: choose another")
        try:
            read_adapter_config(folder)
        except (ValueError, OSError) as e:
            raise ValueError(f"adapter {name!r}: {e}") from None


def create_app(lm, model_name: str, config: ServeConfig | None = None, local_only: bool = True,
               footprint=None) -> FastAPI:
    """The app serving `lm` as `model_name`; footprint: a running footprint Tracker, whose energy and
    CO2 so far /metrics reports."""
    c = config or ServeConfig()
    api_key, log_prompts, max_body = c.api_key, c.log_prompts, c.max_body
    adapters = RowAdapters(lm.model)
    check_adapters(c.lora, model_name)
    for name, folder in c.lora.items():
        try:
            adapters.add(name, folder)
        except (ValueError, OSError) as e:
            raise ValueError(f"adapter {name!r}: {e}") from None
    engine = Engine(lm, max_batch=c.max_batch, max_len=c.context, prefill_chunk=c.prefill_chunk,
                    prefix_cache_bytes=c.prefix_cache_mb * 2**20, adapters=adapters)
    max_chars = CHARS_PER_TOKEN * engine.max_len
    created = int(time.time())

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="slm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    metrics = app.state.metrics = Metrics(engine, footprint)
    engine.observer = metrics

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        if err.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}").response()
        return APIError(400, f"{param or 'body'}: {err.get('msg')}", param=param).response()

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return APIError(e.status_code, str(e.detail), type="not_found_error" if e.status_code == 404 else
                        "invalid_request_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(os.path.join(os.path.dirname(__file__), "chat.html"), encoding="utf-8") as f:
            html = f.read()
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=METRICS_TYPE)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "slm", "context_length": engine.max_len}
        if name != model_name:  # an adapter: as vLLM lists its LoRA models
            card.update(parent=model_name, root=adapters.adapters[name].folder)
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in [model_name, *adapters.adapters]]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card(model_id)

    def check_model(name: str) -> None:
        if name != model_name and name not in adapters.adapters:
            also = f" and the adapters {', '.join(map(repr, adapters.adapters))}" if adapters.adapters else ""
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'{also}",
                           param="model", code="model_not_found")

    def adapter_of(name: str) -> str | None:
        """The adapter a request's (checked) model names, None for the base model."""
        return None if name == model_name else name

    async def grammar_of(body: _Common) -> str | None:
        """The request's grammar (response_format or grammar), checked against the vocabulary in a
        worker thread (the first also builds llguidance's view of the tokenizer, ~0.2 s)."""
        try:
            g = grammar_for(body.response_format, body.grammar)
            if g is not None:
                await asyncio.to_thread(engine.constraints.check, g)
            return g
        except GrammarError as e:
            raise APIError(400, str(e), param="grammar" if body.grammar is not None else "response_format") from None

    def params(body: _Common, prompt_len: int, default_max: int | None, logprobs: int | None,
               grammar: str | None = None) -> Params:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(400, f"stop: give up to {MAX_STOP} non-empty strings", param="stop")
        if len(body.logit_bias or {}) > MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(body.logit_bias)}",
                           param="logit_bias")
        for t in body.logit_bias or {}:
            if not 0 <= t < engine.vocab or not -100 <= body.logit_bias[t] <= 100:
                raise APIError(400, f"logit_bias: token ids in [0, {engine.vocab}), biases in [-100, 100]",
                               param="logit_bias")
        room = engine.max_len - prompt_len
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max or room
        if max_tokens > room or room < 1:
            raise APIError(400, f"this model's maximum context length is {engine.max_len} tokens; the request "
                                f"needs {prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to "
                                f"generate): shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        if (body.n or 1) > engine.max_batch:
            raise APIError(400, f"n: at most {engine.max_batch} on this server", param="n")
        # omitted fields: OpenAI's defaults (temperature 1, see runtime/sampling.py), else slm's
        given = {"top_p": body.top_p, "seed": body.seed, "presence_penalty": body.presence_penalty,
                 "frequency_penalty": body.frequency_penalty, "logit_bias": body.logit_bias}
        temperature = OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
        return Params(max_tokens=max_tokens, logprobs=logprobs, stop=stop, temperature=temperature, grammar=grammar,
                      adapter=adapter_of(body.model), **{k: v for k, v in given.items() if v is not None})

    def submit(prompts: list[list[int]], ps: list[Params], n: int) -> list[EngineRequest]:
        queue = asyncio.Queue()
        reqs = [EngineRequest(ids, p, n, queue, i * n) for i, (ids, p) in enumerate(zip(prompts, ps))]
        try:
            engine.submit_all(reqs)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry shortly", code="queue_full",
                           type="rate_limit_error") from None
        return reqs

    async def tokenized(given, param: str, limit: int, noun: str, code: str | None = None, empty_text: bool = True):
        """(the inputs as a list, their token ids) of a prompt or input field: a string, token ids
        or a list of either; each checked (length, ids in the vocabulary), tokenized in a worker."""
        xs = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else given
        if not xs:
            raise APIError(400, f"{param}: empty", param=param)
        if len(xs) > limit:
            raise APIError(400, f"{param}: at most {limit} {noun} per request, got {len(xs)}", param=param, code=code)
        for i, x in enumerate(xs):
            if isinstance(x, str):
                if not x and not empty_text:
                    raise APIError(400, f"{param}[{i}]: an empty string", param=param)
                check_length(x, param)

        def encode_all() -> list[list[int]]:  # in a worker thread
            return [lm.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in xs]
        try:
            ids = await asyncio.to_thread(encode_all)
        except Exception:  # the tokenizer takes valid Unicode only (no lone surrogates)
            raise APIError(400, f"{param}: not valid Unicode text", param=param) from None
        for i, p in enumerate(ids):
            if not p or any(not 0 <= t < engine.vocab for t in p):
                raise APIError(400, f"{param}[{i}]: token ids must be in [0, {engine.vocab}) and not empty",
                               param=param)
        return xs, ids

    def check_length(text: str, param: str) -> None:
        if len(text) > max_chars:
            raise APIError(400, f"{param}: {len(text)} characters, more than the {max_chars} this server takes "
                                f"({CHARS_PER_TOKEN} per token of its {engine.max_len}-token context)",
                           param=param, code="context_length_exceeded")

    async def checked(reqs):
        async for d in deltas(reqs):
            if d.finish_reason == "error":
                raise APIError(500, "generation failed (see the server's log)", type="server_error")
            yield d

    # -- /v1/completions -----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: at least 1 (0 only with echo)", param="max_tokens")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of must equal n (every sample is returned)", param="best_of")
        p, prompts = await tokenized(body.prompt, "prompt", MAX_PROMPTS, "prompts", code="too_many_prompts")
        grammar = await grammar_of(body)
        n = body.n or 1
        if body.max_tokens == 0:  # echo alone: the prompts' logprobs, nothing generated
            for ids in prompts:
                if len(ids) > engine.max_len:
                    raise APIError(400, f"this model's maximum context length is {engine.max_len} tokens; the "
                                        f"prompt has {len(ids)}", param="prompt", code="context_length_exceeded")
            reqs = []
        else:
            ps = [params(body, len(ids), 16, body.logprobs, grammar) for ids in prompts]  # OpenAI's default: 16
            reqs = submit(prompts, ps, n)
        echo: list[tuple[str, list]] = []  # each prompt's text and (with logprobs) its tokens' logprobs
        if body.echo:
            texts = [x if isinstance(x, str) else lm.tokenizer.decode(x, skip_special_tokens=False) for x in p]
            if body.logprobs is not None:
                try:
                    lps = await asyncio.gather(*(asyncio.wrap_future(engine.prompt_logprobs(ids, body.logprobs,
                                                                                      adapter_of(body.model)))
                                                 for ids in prompts))
                except BaseException:
                    for r in reqs:
                        r.cancel()
                    raise
            else:
                lps = [[] for _ in prompts]
            echo = list(zip(texts, lps))
        rid = f"cmpl-{uuid.uuid4().hex}"
        if log_prompts:
            log.info("%s prompt: %r", rid, body.prompt)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model}

        def choice(index, text, lps, finish):
            return {"index": index, "text": text, "logprobs": legacy_logprobs(lps) if body.logprobs is not None
                    else None, "finish_reason": finish}

        def echoed(index, text, lps):  # the prompt before what was generated; offsets after it
            if not echo:
                return text, lps
            head, head_lps = echo[index // n]
            return head + text, head_lps + [replace(x, offset=x.offset + len(head)) for x in lps]

        def counts() -> dict:
            if reqs:
                return usage(reqs)
            tokens = n * sum(map(len, prompts))
            return {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}

        if body.stream:
            async def events():
                for i in range(n * len(prompts) if echo else 0):  # the prompts first
                    text, lps = echo[i // n]
                    yield sse({**base, "choices": [choice(i, text, lps, None if reqs else "length")]})
                async for d in checked(reqs):
                    if d.text or d.logprobs or d.finish_reason:
                        lps = [replace(x, offset=x.offset + len(echo[d.index // n][0])) for x in d.logprobs] \
                            if echo else d.logprobs
                        yield sse({**base, "choices": [choice(d.index, d.text, lps, d.finish_reason)]})
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**base, "choices": [], "usage": counts()})
            return stream(events(), reqs, rid)
        out = await collect(request, reqs, rid) if reqs else \
            [(None, "", []) for _ in range(n * len(prompts))]
        return {**base, "choices": [choice(i, *echoed(i, text, lps), d.finish_reason if d else "length")
                                    for i, (d, text, lps) in enumerate(out)], "usage": counts()}

    # -- /v1/chat/completions ------------------------------------------------------------------
    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        check_model(body.model)
        messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
        if isinstance(body.input, str):
            messages.append({"role": "user", "content": body.input})
        else:
            for i, item in enumerate(body.input):
                content = item.get("content") if isinstance(item, dict) else None
                if isinstance(content, list):  # input_text / output_text parts
                    if any(not isinstance(p, dict) or not isinstance(p.get("text"), str) for p in content):
                        raise APIError(400, "only text content parts are supported", param=f"input.{i}.content")
                    content = "".join(p["text"] for p in content)
                role = item.get("role") if isinstance(item, dict) else None
                if role not in ("system", "developer", "user", "assistant") or not isinstance(content, str):
                    raise APIError(400, "input: messages with a role (system, developer, user, assistant) and text "
                                        "content", param=f"input.{i}")
                messages.append({"role": "system" if role == "developer" else role, "content": content})
        check_length("".join(m["content"] for m in messages), "input")
        try:
            ids = await asyncio.to_thread(lm.tokenizer.encode_chat, messages)
        except Exception as e:
            raise APIError(400, f"input: the chat template refused it: {e}", param="input") from None
        chat = ChatRequest(model=body.model, messages=[{"role": "user", "content": ""}],
                           max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p)
        reqs = submit([ids], [params(chat, len(ids), None, None)], 1)
        rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"

        def response(text: str, status: str, finish: str | None) -> dict:
            out = [] if status == "in_progress" else [
                {"type": "message", "id": mid, "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": text, "annotations": []}]}]
            u = usage(reqs)
            return {"id": rid, "object": "response", "created_at": int(time.time()), "model": body.model,
                    "status": status, "output": out, "error": None,
                    "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
                    "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                    "temperature": body.temperature, "top_p": body.top_p, "parallel_tool_calls": False,
                    "tool_choice": "none", "tools": [],
                    "usage": {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                              "total_tokens": u["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}}}

        def final_status(finish: str | None) -> str:
            return "incomplete" if finish == "length" else "completed"

        if body.stream:
            async def events():
                n = 0

                def event(kind, **fields):
                    nonlocal n
                    n += 1
                    return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': n, **fields})}\n\n"
                yield event("response.created", response=response("", "in_progress", None))
                item = {"type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}
                yield event("response.output_item.added", output_index=0, item=item)
                part = {"type": "output_text", "text": "", "annotations": []}
                yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part)
                text, finish = "", None
                async for d in checked(reqs):
                    if d.text:
                        text += d.text
                        yield event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                                    delta=d.text)
                    finish = d.finish_reason or finish
                yield event("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text)
                part = {"type": "output_text", "text": text, "annotations": []}
                yield event("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part)
                item = {**item, "status": "completed", "content": [part]}
                yield event("response.output_item.done", output_index=0, item=item)
                done_kind = "response.completed" if finish != "length" else "response.incomplete"
                yield event(done_kind, response=response(text, final_status(finish), finish))
            return stream(events(), reqs, rid, done_line=False)
        (d, text, _), = await collect(request, reqs, rid)
        return response(text, final_status(d.finish_reason), d.finish_reason)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model)
        _, ids = await tokenized(body.input, "input", MAX_EMBED_INPUTS, "inputs", empty_text=False)
        for i, p in enumerate(ids):
            if len(p) > engine.max_len:
                raise APIError(400, f"input[{i}]: {len(p)} tokens, more than this model's context of "
                                    f"{engine.max_len}", param="input", code="context_length_exceeded")
        vectors = await asyncio.gather(*(asyncio.wrap_future(f) for f in engine.embed(ids, adapter_of(body.model))))

        def encoded(v):
            if body.encoding_format == "base64":  # OpenAI's: the fp32 values' little-endian bytes
                return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            return v.tolist()
        n = sum(map(len, ids))
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):  # content parts: text only
                if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                    raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
                content = "".join(part["text"] for part in content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or "",
                             **({"tool_calls": m.tool_calls} if m.tool_calls else {})})
        try:
            fns, must_call = tools.chosen(tools.functions(body.tools or []), body.tool_choice)
            takes_tools = "tools" in (lm.tokenizer.chat_template or "")
            messages = tools.messages_with_tools(messages, fns, takes_tools)
        except tools.ToolError as e:
            raise APIError(400, str(e), param="tools") from None
        check_length("".join(m["content"] for m in messages), "messages")
        try:  # in a worker thread: rendering and tokenizing a long conversation takes a while
            ids = await asyncio.to_thread(lm.tokenizer.encode_chat, messages,
                                          tools=[{"type": "function", "function": f} for f in fns] if takes_tools and fns
                                          else None)
        except Exception as e:  # the checkpoint's template may refuse an order of roles
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        k = (body.top_logprobs or 0) if body.logprobs else None
        if must_call:  # the reply is a call: its arguments follow the function's schema
            if body.response_format or body.grammar:
                raise APIError(400, "tool_choice 'required' or a named function, and a response format: give one",
                               param="tool_choice")
            try:
                grammar = tools.call_grammar(fns)
                await asyncio.to_thread(engine.constraints.check, grammar)
            except GrammarError as e:
                raise APIError(400, str(e), param="tools") from None
        else:
            grammar = await grammar_of(body)
        reqs = submit([ids], [params(body, len(ids), None, k, grammar)], body.n or 1)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if log_prompts:
            log.info("%s messages: %r", rid, messages)
        base = {"id": rid, "object": "chat.completion.chunk" if body.stream else "chat.completion",
                "created": int(time.time()), "model": body.model}

        def lp_content(lps):
            return {"content": [chat_logprob(x) for x in lps]} if body.logprobs else None

        def message(text: str, finish: str | None) -> tuple[dict, str | None]:
            """The assistant's message (its tool calls parsed out, where tools were offered)."""
            if not fns:
                return {"role": "assistant", "content": text}, finish
            content, calls = tools.parse(text, fns)
            if not calls:
                return {"role": "assistant", "content": text}, finish
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"

        if body.stream and fns:  # a tool call is known only once complete: each choice comes whole
            async def with_tools():
                texts, lps = {}, {}
                for i in range(body.n or 1):
                    yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                async for d in checked(reqs):
                    texts[d.index] = texts.get(d.index, "") + d.text
                    lps[d.index] = lps.get(d.index, []) + d.logprobs
                    if d.finish_reason:
                        msg, finish = message(texts[d.index], d.finish_reason)
                        delta = {"content": msg["content"]} if msg["content"] else {}
                        if "tool_calls" in msg:
                            delta["tool_calls"] = [{"index": j, **c} for j, c in enumerate(msg["tool_calls"])]
                        yield sse({**base, "choices": [{"index": d.index, "delta": delta,
                                                        "logprobs": lp_content(lps[d.index]), "finish_reason": None}]})
                        yield sse({**base, "choices": [{"index": d.index, "delta": {}, "logprobs": None,
                                                        "finish_reason": finish}]})
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**base, "choices": [], "usage": usage(reqs)})
            return stream(with_tools(), reqs, rid)
        if body.stream:
            async def events():
                for i in range(body.n or 1):
                    yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                async for d in checked(reqs):
                    if d.text or d.logprobs or d.finish_reason:
                        delta = {"content": d.text} if d.text or not d.finish_reason else {}
                        yield sse({**base, "choices": [{"index": d.index, "delta": delta,
                                                        "logprobs": lp_content(d.logprobs),
                                                        "finish_reason": d.finish_reason}]})
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**base, "choices": [], "usage": usage(reqs)})
            return stream(events(), reqs, rid)
        out = await collect(request, reqs, rid)
        choices = []
        for d, text, lps in out:
            msg, finish = message(text, d.finish_reason)
            choices.append({"index": d.index, "message": msg, "logprobs": lp_content(lps), "finish_reason": finish})
        return {**base, "choices": choices, "usage": usage(reqs)}

    # -- shared by both routes -----------------------------------------------------------------
    def stream(events, reqs, rid, done_line: bool = True) -> StreamingResponse:
        async def body():
            t0 = time.perf_counter()
            try:
                async for chunk in events:
                    yield chunk
                done(rid, reqs, t0)
            except APIError as e:  # the status line has gone out: report the error as an event
                yield sse(e.body())
            finally:  # the client went away (or we are done): stop spending compute on it
                for r in reqs:
                    r.cancel()
            if done_line:  # chat and completions end with it; /v1/responses with its own last event
                yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def collect(request: Request, reqs, rid):
        """Gather every choice; give up (and free the rows) if the client disconnects first."""
        t0 = time.perf_counter()
        n = sum(r.n for r in reqs)
        texts, lps, last = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n

        async def gather():
            async for d in checked(reqs):
                texts[d.index].append(d.text)
                lps[d.index] += d.logprobs
                if d.finish_reason:
                    last[d.index] = d

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        try:
            finished, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                for r in reqs:
                    r.cancel()
        if work not in finished:
            raise APIError(499, "client disconnected")
        work.result()  # raises if generation failed
        done(rid, reqs, t0, texts)
        return [(last[i], "".join(texts[i]), lps[i]) for i in range(n)]

    def done(rid, reqs, t0, texts=None) -> None:
        log.info("%s: %d prompt + %d completion tokens in %.2f s", rid, sum(len(r.prompt_ids) for r in reqs),
                 sum(sum(r.completion_tokens) for r in reqs), time.perf_counter() - t0)
        if log_prompts and texts is not None:
            log.info("%s output: %r", rid, ["".join(t) for t in texts])

    def usage(reqs) -> dict:
        p, c = sum(len(r.prompt_ids) for r in reqs), sum(sum(r.completion_tokens) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    app.add_middleware(_Guard, api_key=api_key, local_only=local_only, max_body=max_body, timeout=c.timeout)
    app.add_middleware(_Counted, metrics=metrics)  # outermost: the guard's refusals count too
    return app


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def legacy_logprobs(lps) -> dict:
    """/v1/completions' logprobs: parallel lists, top alternatives as {token: logprob} (two tokens
    of the same text, as byte pieces, share a key: the likelier one's logprob); an echoed prompt's
    first token has neither (nothing comes before it), as OpenAI's null."""
    return {"tokens": [x.token for x in lps], "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [dict(reversed(x.top)) if x.logprob is not None else None for x in lps],
            "text_offset": [x.offset for x in lps]}


def chat_logprob(x) -> dict:
    entry = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}  # noqa: E731
    return {**entry(x.token, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]}


class _Counted:
    """Counts every answer by route and status (/metrics), streamed ones as they start."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(scope["path"], message["status"])
            await send(message)
        await self.app(scope, receive, counted)


# -- host check, API key, body size: before any route runs -------------------------------------
LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]"}


class _Guard:
    def __init__(self, app, api_key: str | None, local_only: bool, max_body: int, timeout: float):
        self.app, self.max_body, self.local_only, self.timeout = app, max_body, local_only, timeout
        self.auth = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").lower()
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.local_only and host not in LOCAL_HOSTS:
            return await _reply(send, APIError(400, f"invalid Host header '{host}': this server answers only "
                                                    "to localhost", code="invalid_host"))
        if self.auth and scope["path"].startswith("/v1/") and \
                not hmac.compare_digest(headers.get(b"authorization", b""), self.auth):
            return await _reply(send, APIError(401, "missing or incorrect API key (Authorization: Bearer KEY)",
                                               code="invalid_api_key", type="authentication_error"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the whole body here, bounded in size and time, then hand it on.
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.timeout):
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    size += len(msg.get("body", b""))
                    if size <= self.max_body:
                        chunks.append(msg.get("body", b""))
                    elif size > 16 * self.max_body:
                        break  # stop reading an endless body; the connection will be closed
                    more = msg.get("more_body", False)
        except TimeoutError:
            return await _reply(send, APIError(408, f"the request body did not arrive within {self.timeout:g} s",
                                               code="request_timeout"), close=True)
        if size > self.max_body:
            return await _reply(send, APIError(413, f"the request body is larger than {self.max_body} bytes",
                                               code="body_too_large"))
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(send, e: APIError, close: bool = False) -> None:
    data = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": e.status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": data})


def timed_protocol(timeout: float):
    """uvicorn's h11 protocol, with a deadline for each request's head: a connection that sends
    nothing, or half a head, for `timeout` seconds (from its opening or from the end of the last
    response) is closed. uvicorn's own keep-alive timer stops at the first byte of a request, so
    without this a client could hold a connection open for ever with a few bytes."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the head is in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or an OSError that says why not."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart at once after a stop
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is already in use: stop what listens there, or pass another "
                          "--port (0 picks a free one)") from None
        raise OSError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return sock


# -- slm serve ---------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


GIL_SWITCH_SECONDS = 0.0005


def in_passing_thread(fn):
    """fn() in a new thread that ends with it: its result, or its exception raised here."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller as it is
            box["error"] = e
    t = threading.Thread(target=run, name="slm-load", daemon=True)  # Ctrl-C during a load ends the process
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run(model: str | None = None, config: ServeConfig | None = None, dtype=None, device=None, quantize=None,
        group_size=None, on_load=None, tokenizer=None, footprint=None) -> None:
    c = config or ServeConfig()
    host, port, name = c.host, c.port, c.name
    local = is_loopback(host)
    if not local and not c.api_key:
        raise ValueError(f"refusing to listen on {host}, which is not a loopback address, without an API key: "
                         "pass --api-key KEY (or set SLM_API_KEY), or keep the default --host 127.0.0.1")
    import uvicorn

    # The port first: one in use is an error now, not after the model has loaded.
    with listen(host, port) as sock:
        if name is None:
            name = DEFAULT_MODEL if model is None else os.path.basename(os.path.normpath(model))
            name = name[:-5] if name.endswith(".gguf") else name
        check_adapters(c.lora, name)

        def build():
            lm = load(model, dtype=dtype, device=device, quantize=quantize, group_size=group_size, tokenizer=tokenizer)
            if on_load is not None:  # e.g. the footprint receipt's token counter
                on_load(lm)
            return create_app(lm, name, c, local_only=local, footprint=footprint)
        # Loaded in a thread that then ends, and with it the OpenMP worker pool that loading
        # started: the engine thread's must be the process's only one (engine.zeros_without_openmp).
        app = in_passing_thread(build)
        # What is alive now (the libraries, the model, the tokenizer: ~190k objects) stays alive
        # while serving: out of the collector's reach, a full collection no longer walks them. It
        # took 55-85 ms with the GIL held, a gap that size in every stream.
        gc.collect()
        gc.freeze()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("slm serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        shown, port = f"[{host}]" if ":" in host else host, sock.getsockname()[1]  # port 0: the one bound
        print(f"slm serve: {name} at http://{shown}:{port}/ (API: http://{shown}:{port}/v1, "
              f"{c.max_batch} sequences at once, context {app.state.engine.max_len}"
              f"{', prompts logged' if c.log_prompts else ''})", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3,
                                               timeout_keep_alive=c.timeout, http=timed_protocol(c.timeout)))
        # The engine thread decodes between the event loop's turns; with Python's default switch
        # interval (5 ms) a request being parsed or answered could keep every stream waiting that
        # long for the interpreter. PyTorch releases it during its ops either way.
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        server.run(sockets=[sock])
        if not server.started:
            raise OSError("the server did not start (see the lines above)")
