"""Continuous batching: one decode loop shares the model among all requests.

A background thread owns the model and a RowKVCache of `max_batch` rows. Between decode steps it
admits waiting requests: the prompt is prefilled in a batch-1 cache, copied into a free row (into
n rows for n choices) and the first token is sampled. Each decode step then advances every busy
row by one token in a single forward pass. A sequence that ends (EOS, stop string, max_tokens) or
whose client went away frees its row at once, and a waiting request takes it at the next step.

Requests talk to the loop through `Request`: the HTTP side submits one and iterates its events
(`Delta`s) asynchronously; `Request.cancel()` stops it from consuming compute.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model import RowKVCache
from ..runtime.sampling import Row, Sampling, sample_rows
from ..runtime.tokenizer import Detokenizer

log = logging.getLogger("slm.serve")


@dataclass(kw_only=True)
class Params(Sampling):
    """A request's sampling settings (runtime.sampling's defaults; the API fills in OpenAI's), how
    many tokens it may generate, and the logprobs it wants."""
    max_tokens: int
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]
    offset: int  # where the token's text starts in the completion


@dataclass
class Delta:
    """What one choice produced in one step: new text (maybe empty while a stop string may be
    forming), the sampled token's logprobs, and finish_reason on its last delta."""
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "error"


class QueueFull(Exception):
    pass


class Request:
    """One prompt with n choices. Created on the event loop; the engine thread pushes Deltas."""

    def __init__(self, prompt_ids: list[int], params: Params, n: int = 1, queue: asyncio.Queue | None = None,
                 first_index: int = 0):
        self.prompt_ids, self.params, self.n, self.first_index = prompt_ids, params, n, first_index
        self.completion_tokens = [0] * n
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self.queue = queue or asyncio.Queue()  # several prompts of one API call may share one queue
        self.engine: Engine | None = None

    def _push(self, deltas: list[Delta]) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self.queue.put_nowait, deltas)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.engine is not None:
                self.engine.wake()



async def deltas(reqs: list[Request]):
    """The Deltas of requests sharing one queue, as they come, until every choice has finished.
    What piled up while the consumer was busy comes merged, one Delta per choice: a slow client
    (or a busy event loop) gets fewer, larger events instead of falling further behind."""
    remaining, queue = sum(r.n for r in reqs), reqs[0].queue
    while remaining:
        batch = await queue.get()
        while not queue.empty():
            batch += queue.get_nowait()
        merged: dict[int, Delta] = {}
        for d in batch:
            if d.index in merged:
                m = merged[d.index]
                m.text, m.finish_reason = m.text + d.text, d.finish_reason
                m.logprobs = m.logprobs + d.logprobs
            else:
                merged[d.index] = d
        for d in merged.values():
            remaining -= d.finish_reason is not None
            yield d


class _Seq:
    """One choice of a request, living in one cache row."""

    def __init__(self, req: Request, index: int, row: int, tokenizer, vocab: int, device):
        p = req.params
        self.req, self.index, self.row = req, index, row
        self.pos = len(req.prompt_ids)  # position of the next token fed to the model
        self.tokens: list[int] = []
        self.text = Detokenizer(tokenizer, p.stop)
        # One generator per choice: a seeded request samples the same tokens alone or in a batch.
        self.sampler = Row(p, vocab, device, prompt=req.prompt_ids, index=index)
        if self.sampler.gen is None:  # no seed: one of its own from fresh entropy, off the global one
            self.sampler.gen = torch.Generator(device=device)
            self.sampler.gen.seed()


class Engine:
    def __init__(self, lm, max_batch: int, max_len: int | None = None, max_waiting: int = 256):
        if lm.tokenizer is None:
            raise ValueError("serving needs a tokenizer: load a folder with tokenizer.json or a .gguf file")
        self.model, self.tokenizer, self.eos_ids = lm.model, lm.tokenizer, lm.eos_ids
        cfg = self.model.config
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.device, self.vocab = self.model.device, cfg.vocab_size
        self.cache = RowKVCache(cfg, max_batch, self.max_len, self.model.device, self.model.dtype)
        self.rows: list[_Seq | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.generated, self.peak = 0, 0  # tokens sampled and most rows busy at once, since start (/health)
        self._token_text: dict[int, str] = {}

    # -- called from the event loop ------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if len(req.prompt_ids) + req.params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) plus max_tokens ({req.params.max_tokens}) "
                             f"must fit the context of {self.max_len} tokens")
        if req.n > self.max_batch:
            raise ValueError(f"n={req.n} is more than the {self.max_batch} sequences this server runs at once")
        with self.cond:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            req.engine = self
            self.waiting.append(req)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def stats(self) -> dict:
        return {"running": sum(s is not None for s in self.rows), "waiting": len(self.waiting),
                "max_batch": self.max_batch, "context": self.max_len, "generated_tokens": self.generated,
                "peak_running": self.peak}

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="slm-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    # -- the loop (engine thread) --------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while self.running and not self.waiting and not any(self.rows):
                        self.cond.wait()
                    if not self.running:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if any(self.rows):
                        self._step()
                except Exception:  # fail what is in flight, keep serving
                    log.exception("decode step failed")
                    for s in self.rows:
                        if s is not None:
                            self._finish(s, [Delta(s.req.first_index + s.index, finish_reason="error")])

    def _drop_cancelled(self) -> None:
        for s in self.rows:
            if s is not None and s.req.cancelled:
                self.rows[s.row] = None

    def _admit(self) -> None:
        while True:
            with self.cond:
                if not self.waiting:
                    return
                req = self.waiting[0]
                free = [i for i, s in enumerate(self.rows) if s is None]
                if not req.cancelled and len(free) < req.n:
                    return  # first come, first served: wait for rows to free up
                self.waiting.popleft()
            if req.cancelled:
                continue
            try:
                small = self.model.new_cache(1, len(req.prompt_ids))
                ids = torch.tensor([req.prompt_ids], device=self.device)
                logits = self.model(ids, cache=small, last_only=True)[:, -1]
            except Exception:
                log.exception("prefill failed")
                req._push([Delta(req.first_index + i, finish_reason="error") for i in range(req.n)])
                continue
            seqs = []
            for i, row in zip(range(req.n), free):  # the lowest free rows: busy rows stay packed at the front
                self.cache.load_row(row, small)
                seqs.append(_Seq(req, i, row, self.tokenizer, self.vocab, self.device))
                self.rows[row] = seqs[-1]
            self._advance(seqs, logits.expand(req.n, -1), list(range(req.n)))

    def _step(self) -> None:
        busy = [s for s in self.rows if s is not None]
        self.peak = max(self.peak, len(busy))
        B = max(s.row for s in busy) + 1  # rows past the last busy one are not computed
        ids = torch.zeros(B, 1, dtype=torch.long)
        pos = torch.full((B, 1), -1, dtype=torch.long)
        for s in busy:
            ids[s.row, 0], pos[s.row, 0] = s.tokens[-1], s.pos
            s.pos += 1
        logits = self.model(ids.to(self.device), cache=self.cache, pos=pos.to(self.device))[:, -1]
        self._advance(busy, logits, [s.row for s in busy])

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor, rows: list[int]) -> None:
        """Sample one token for each sequence from its row of logits and send what it produced."""
        x = logits if rows == list(range(logits.shape[0])) else logits[rows]
        toks = sample_rows(x, [s.sampler for s in seqs])
        lps: list[TokenLogprob | None] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.req.params.logprobs is not None]
        if want:  # logprobs are the model's own distribution (raw logits), as vLLM reports by default
            logp = F.log_softmax(x[want].float(), -1)
            for j, i in enumerate(want):
                lps[i] = self._logprob(logp[j], toks[i], seqs[i].req.params.logprobs, seqs[i])
        out: dict[Request, list[Delta]] = {}
        for s, tok, lp in zip(seqs, toks, lps):
            self.generated += 1
            s.tokens.append(tok)
            s.req.completion_tokens[s.index] += 1
            out.setdefault(s.req, []).append(self._delta(s, tok, lp))
        for req, deltas in out.items():
            req._push(deltas)

    def _delta(self, s: _Seq, tok: int, lp: TokenLogprob | None) -> Delta:
        d = Delta(s.req.first_index + s.index, logprobs=[lp] if lp else [])
        if tok in self.eos_ids:
            d.text, d.finish_reason = s.text.flush(), "stop"
        else:
            d.text, stopped = s.text.add(tok)
            if stopped:
                d.finish_reason = "stop"
            elif len(s.tokens) >= s.req.params.max_tokens:
                d.text, d.finish_reason = d.text + s.text.flush(), "length"
        if d.finish_reason:
            self.rows[s.row] = None
        return d

    def _finish(self, s: _Seq, deltas: list[Delta]) -> None:
        self.rows[s.row] = None
        s.req._push(deltas)

    def _logprob(self, logp: torch.Tensor, tok: int, k: int, s: _Seq) -> TokenLogprob:
        offset = len(s.text.text)
        top = []
        if k:
            vals, idx = logp.topk(k)
            top = [(self.token_text(i), v) for i, v in zip(idx.tolist(), vals.tolist())]
        return TokenLogprob(self.token_text(tok), float(logp[tok]), top, offset)

    def token_text(self, tok: int) -> str:
        if tok not in self._token_text:
            self._token_text[tok] = self.tokenizer.decode([tok], skip_special_tokens=False)
        return self._token_text[tok]
