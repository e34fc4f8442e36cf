"""Continuous batching: one decode loop shares the model among all requests.

A background thread owns the model and a RowKVCache of `max_batch` rows. Each turn of its loop
does one piece of prefill, then one decode step of every busy row:

- Prefill: a waiting request's prompt goes through the model in chunks, in a batch-1 cache. While
  other rows are decoding, a turn of prefill puts a chunk through as many whole layers as fit in a
  quarter of a decode step (half while two or more prompts are going in; Transformer.forward_by_layer;
  the loop times both), stopping before a layer that would overrun, so a long prompt slows the
  running streams by about 1.25x instead of stopping them for its whole prefill. Several prompts
  may be going in at once (as many as there are free rows for); each turn goes to the one with the
  fewest tokens left: a short prompt is not held up behind a long one. Once a
  prompt is in, its cache is copied into its rows (n rows for n choices) and the first token is
  sampled. The copies (into its rows, and from the prefix cache before its first chunk) go a
  layer at a time within the same budget: a 4,000-token prompt's keys and values are ~180 MB
  for SmolLM2, ~40 ms copied in one go, a gap that long in every stream.
- A prompt with few tokens left after its prefix-cache match (RIDE_TOKENS: a chat's new message,
  a request behind a cached system prompt) rides the decode steps instead, where the fused
  decoder runs them (slm.accel.decoder.fused_rows): the match's keys and values are copied into
  its row, and its tokens go through the model as extra tokens of that row in the next steps,
  beside the other rows' next tokens (chunked prefill, as vLLM does), worth at most RIDE_SHARE of
  a step each; its first token is sampled with the rows'. No batch-1 cache, no layer-by-layer
  turns, no copy of the prompt into its row.
- Admission is fair between groups of requests (the prompts of one API call form a group): the
  groups take turns, one prompt each, so a call with 64 prompts does not hold every row before
  the next caller gets one.
- A decode step advances every busy row by one token in a single forward pass. A sequence that
  ends (EOS, stop string, max_tokens) or whose client went away frees its row at once.

When the loop falls idle after work it hands freed heap pages back to the system (glibc's
malloc_trim): the transient buffers of a burst (prompts, prefill activations) would otherwise stay
resident for good.

Requests talk to the loop through `Request`: the HTTP side submits one and iterates its events
(`Delta`s) asynchronously; `Request.cancel()` stops it from consuming compute.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import itertools
import logging
import math
import mmap
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..accel.decoder import fused_rows
from ..model import KVCache, RowKVCache, kv_cache
from ..model.config import ModelConfig
from ..runtime.adapters import RowAdapters
from ..runtime.sampling import Row, Sampling, sample_rows
from ..runtime.tokenizer import Detokenizer
from .grammar import Constraints
from .prefix import Entry, PrefixCache

log = logging.getLogger("slm.serve")

PROMPT_LOGPROB_ROWS = 256  # positions whose full logits are held at once (echo: the prompt's logprobs)
EMBED_TOKENS = 2048  # padded tokens of one embedding batch (one engine turn)
PREFIX_CACHE_BYTES = 512 * 2**20  # finished sequences kept for prompts that start with one (serve/prefix.py)
MAPPED_BYTES = 1 << 18  # prompt cache tensors at least this large are mapped from the system
# Tokens of room beyond its completion in the cache of a prompt of one choice, where that room
# costs nothing until written (mapped tensors, on a CPU): the chat's next turn (this prompt, its
# reply and a new message) then continues in the same cache when it is taken from the prefix
# cache, with no allocation and no copy of the history (serve/prefix.py). Measured on SmolLM2's
# fifth turn of a chat (benchmarks/serve_throughput.py --turns 5): allocating and copying the
# history cost ~10 ms of its ~60 ms to first token.
NEXT_TURN_ROOM = 1024
PREFILL_CHUNK = 512  # the most prompt tokens one prefill forward takes
# The least while other rows decode (a forward's fixed cost dominates a few tokens' cost, so
# smaller chunks would only admit slower); above it, a chunk is sized so that one of its layers
# costs about half a turn.
MIN_CHUNK = 16
# While other rows decode, a turn of prefill may take this share of a decode step of as many rows
# as are decoding: the running streams then slow by about 1.25x while a long prompt goes in at
# about a fifth of the speed it gets alone. (At 0.5, with whole chunks a turn, a stream's largest
# gap reached 4-6x its pace alone: see tests/serve/test_hardening.py.) A share of the one-row step
# instead, whatever the load, starved admission under load: with 16 clients the steps of 10-16
# SmolLM2 rows cost 35-50 ms, a quarter of a one-row step ~2 ms, and most steps ran with one row
# while the other prompts crawled in (16 clients 1.36x one client).
PREFILL_SHARE = 0.25
# With this many prompts or more going in, a turn of prefill may take that many times
# PREFILL_SHARE: a crowd of new requests (16 clients arriving at once) fills the free rows sooner,
# for streams that slow by at most 1.5x meanwhile. Measured (benchmarks/serve_throughput.py, SmolLM2,
# 16 clients, tokens/s): one-row share ~158; share of the current step 1 -> ~185, 2 -> ~226,
# 4 -> ~226. The stream-gap scenario's largest gap (tests/serve/test_hardening.py's requests, on
# its earlier 64-wide module-path model), median of 6 rounds: 3.4x its pace alone with the one-row
# share, 3.5x at 1, 3.65x at 2, 4.0x at 4.
PREFILL_CROWD = 2
# A prompt with at most this many tokens left after its prefix-cache match goes in by riding the
# decode steps (where the fused decoder runs them): its row takes the matched keys and values, and
# its tokens go through the model as extra tokens of that row in the next steps, beside the other
# rows' next tokens (chunked prefill). Chats and applications resend a cached system prompt or
# history plus a short message, so most requests of a busy server are such prompts. Through the
# module path instead (a batch-1 cache a few layers a turn, then a copy into its row) each took
# ~20 ms of turns over several steps, one prompt at a time, while its row sat idle: with 16
# clients a third of the steps ran with fewer than 14 of 16 rows (docs/serving.md). Longer
# prompts keep that path, whose turns bound the running streams' gaps.
RIDE_TOKENS = 64
# ... and at most this many tokens in all: a token's attention costs as much as its position is
# long, and a rider's last tokens go through the model in one step, where the module path spreads
# a chunk over turns a few layers at a time (the last token of a 4,000-token prompt took a step of
# a 512-wide model from ~6 to ~21 ms).
RIDE_CONTEXT = 1024
# A decode step carries prompt tokens worth this share of its cost, less what the turn's prefill
# before it took, priced at what one more token has cost the steps so far, and at least
# RIDE_MIN_TOKENS (one after a turn of prefill that took a tenth of a step or more); with no row
# decoding, a prefill chunk's worth.
RIDE_SHARE = 0.5
RIDE_MIN_TOKENS = 4


@dataclass(kw_only=True)
class Params(Sampling):
    """A request's sampling settings (runtime.sampling's defaults; the API fills in OpenAI's), how
    many tokens it may generate, and the logprobs it wants."""
    max_tokens: int
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k
    grammar: str | None = None  # llguidance's grammar the text must follow (serve/grammar.py), None: free
    adapter: str | None = None  # the LoRA adapter its rows decode with (Engine's `adapters`), None: the base model


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None: an echoed prompt's first token (nothing before it)
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
        self.created = time.perf_counter()  # for its time to first token
        self._loop = asyncio.get_running_loop()
        # Several prompts of one API call share one queue; they also form one group, which the
        # engine admits in turn with the other groups.
        self.queue = queue or asyncio.Queue()
        self.engine: Engine | None = None

    def _push(self, deltas: list[Delta]) -> None:  # engine thread
        push_all({self: deltas})

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.engine is not None:
                self.engine.wake()



def zeros_without_openmp(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """torch.zeros(shape) from fresh pages of the kernel, for the prompt caches the allocator thread
    makes. torch.zeros would fill a large tensor in an OpenMP parallel region, and the allocator
    thread would keep a worker pool of its own beside the engine thread's: once a process holds
    more OpenMP threads than CPUs, libgomp spins only ~100 times before putting a waiting worker to
    sleep, so each of a decode step's ~120 parallel regions would wake its worker from sleep (a
    SmolLM2 step took 15 ms instead of 5.3 on 2 cores). Nor is it filled here: an anonymous mapping
    comes zeroed and its pages fault in as the prefill writes them, a few at each turn. calloc
    (numpy.zeros) did not do that for long: once glibc had freed a prompt cache its threshold for
    mapping rose above the caches' size, and later ones came from the heap and were cleared, which
    took a core from the running streams for 20-70 ms at each long prompt's arrival (their largest
    gap). A mapping also goes back to the system as soon as the cache is freed."""
    if device is not None and torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if n < MAPPED_BYTES:
        return torch.from_numpy(np.zeros(n, dtype=np.uint8)).view(dtype).view(shape)
    return torch.from_numpy(np.frombuffer(mmap.mmap(-1, n), dtype=np.uint8)).view(dtype).view(shape)


_MADV_POPULATE_WRITE = 23  # Linux 5.14 and later
_madvise = None


def populate(cache: KVCache, slots: int) -> None:
    """Fault in the pages that the first `slots` slots of each of the cache's mapped layer tensors
    [1, heads, S, head dim] occupy, without changing what they hold (madvise MADV_POPULATE_WRITE;
    elsewhere nothing). On the allocator thread, for a riding prompt's cache while its sequence
    decodes: each first write to a page of a fresh mapping costs a fault (~3 us a page on the host
    measured), and the ~1,200 pages a finished SmolLM2 sequence of 100 tokens fills took the engine
    thread ~12 ms when it saved the sequence there."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    if not _madvise:
        return
    page = mmap.PAGESIZE
    for t in cache.k + cache.v:
        if t.device.type != "cpu" or t.numel() * t.element_size() < MAPPED_BYTES or not t.is_contiguous():
            continue  # from the heap (zeros_without_openmp): small, and maybe shared with other data
        n = min(slots, t.shape[2])
        for h in range(t.shape[1]):
            start = t[0, h].data_ptr()
            end = start + n * t.shape[3] * t.element_size()
            first = start - start % page
            if _madvise(first, end - first, _MADV_POPULATE_WRITE) != 0:  # an older kernel: never mind
                _madvise = False
                return


def yield_to_the_engine() -> None:
    """Lower the calling thread's scheduling priority (Linux: niceness 19 for this thread alone):
    the allocator thread's work (unmapping a long prompt's cache, ~180 MB for 4,000 SmolLM2 tokens,
    tens of ms of kernel time) then waits for a free core instead of taking one from the engine's
    OpenMP threads, each of whose parallel regions would stall until it got its core back."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


def push_all(out: dict[Request, list[Delta]]) -> None:
    """Hand each request its deltas (engine thread): one wake-up of each event loop for all of its
    requests. Every wake-up is a write to the loop's self-pipe that hands the interpreter to the
    loop's thread and waits to get it back; one per request per step made a step of 4 rows cost
    the streams several of those waits."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, list[Delta]]]] = {}
    for req, ds in out.items():
        by_loop.setdefault(req._loop, []).append((req, ds))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # its event loop has closed: no one is listening any more
            for req, _ in items:
                req.cancelled = True


def _deliver(items: list[tuple[Request, list[Delta]]]) -> None:  # event loop
    for req, ds in items:
        req.queue.put_nowait(ds)


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
        # its prompt's, with room for it (a request of one choice); a riding prompt's (a future: it
        # is made while the prompt goes in) only keeps the finished sequence for the prefix cache
        self.prompt_cache: KVCache | concurrent.futures.Future | None = None
        self.matcher = None  # its grammar's state (serve/grammar.py), if it follows one
        self.last: float | None = None  # when its last token was sampled
        self.complete = False  # its grammar is complete: nothing may follow
        self.text = Detokenizer(tokenizer, p.stop)
        # One generator per choice: a seeded request samples the same tokens alone or in a batch.
        self.sampler = Row(p, vocab, device, prompt=req.prompt_ids, index=index)
        if self.sampler.gen is None:  # no seed: one of its own from fresh entropy, off the global one
            self.sampler.gen = torch.Generator(device=device)
            self.sampler.gen.seed()


class _Prefill:
    """A request whose prompt is going through the model, chunk by chunk, into a batch-1 cache;
    `rows` are the free rows it will take (kept for it meanwhile)."""

    def __init__(self, req: Request, rows: list[int], cache: concurrent.futures.Future,
                 prefix: tuple[Entry | None, int] = (None, 0), taken: bool = False, ride: bool = False,
                 home: bool = False):
        # The batch-1 cache is allocated on another thread (zeroing a long prompt's cache takes
        # milliseconds the running streams would otherwise wait); `cache` holds it once ready.
        self.req, self.rows, self.pending, self.cache, self.done = req, rows, cache, None, 0
        # (a prefix cache entry, how many of its tokens the prompt starts with), until they are
        # copied; taken: the entry's cache is the prompt's (`cache` holds it already)
        self.prefix, self.taken = prefix, taken
        # A chunk going in layer by layer (Transformer.forward_by_layer), its length, the seconds
        # spent on it so far and the layers done; None between chunks.
        self.parts, self.n, self.spent, self.layers = None, 0, 0.0, 0
        # Keys and values being copied a layer at a time (a generator): from the prefix cache
        # before the prompt's first chunk, or into its rows after its last, whose logits wait in
        # `logits` meanwhile.
        self.copy, self.logits = None, None
        # ride: its tokens go in with the decode steps (RIDE_TOKENS): the prefix's keys and values are
        # copied into its row first, then `done` counts the prompt tokens its row holds; `cache` (the
        # future's) is only where the finished sequence is kept for the prefix cache (None: nowhere).
        # home: its row is the one its prefix-cache match was saved from, which holds it still.
        self.ride, self.home = ride, home


def embed_batch(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Mean-pooled, L2-normalised final hidden states of prompts (left-padded into one batch; the
    padding neither attends nor is attended to, nor counted in the mean): fp32 [d] each."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    h = model(ids, attention_mask=mask if len(prompts) > 1 else None, return_hidden=True).float()
    m = mask[..., None].to(h.dtype)
    mean = (h * m).sum(1) / m.sum(1)
    return list(F.normalize(mean, dim=-1).cpu())


def kv_cache_bytes(cfg: ModelConfig, rows: int, max_len: int, dtype: torch.dtype) -> int:
    """The bytes of a RowKVCache of `rows` rows of `max_len` tokens (keys and values; a layer with
    a shorter sliding window keeps only its window)."""
    size = torch.empty((), dtype=dtype).element_size()
    slots = sum(w if w and w < max_len else max_len for w in map(cfg.layer_window, range(cfg.num_layers)))
    return 2 * rows * cfg.num_kv_heads * cfg.head_dim * slots * size


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None where it cannot be told)."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, RuntimeError):
        pass
    return None


_malloc_trim = None


def release_heap() -> None:
    """Return the C heap's free pages to the system (glibc; elsewhere nothing). glibc keeps freed
    blocks below its mmap threshold (which grows to 32 MiB as large blocks are freed) for reuse,
    so without this a burst's transient tensors and lists stay resident after they are gone."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                _malloc_trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                pass
    if _malloc_trim:
        _malloc_trim(0)


class Engine:
    def __init__(self, lm, max_batch: int, max_len: int | None = None, max_waiting: int = 256,
                 prefill_chunk: int = PREFILL_CHUNK, prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
                 adapters: RowAdapters | None = None):
        if lm.tokenizer is None:
            raise ValueError("serving needs a tokenizer: load a folder with tokenizer.json or a .gguf file")
        for name, value in (("max_batch", max_batch), ("max_waiting", max_waiting), ("prefill_chunk", prefill_chunk),
                            ("max_len", 1 if max_len is None else max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        self.model, self.tokenizer, self.eos_ids = lm.model, lm.tokenizer, lm.eos_ids
        cfg = self.model.config
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self.device, self.vocab = self.model.device, cfg.vocab_size
        # Checked before allocating: a cache too large for memory would fail (or swap) only after
        # the model has loaded, or be killed later by the OOM killer.
        need, have = kv_cache_bytes(cfg, max_batch, self.max_len, self.model.dtype), available_memory(self.device)
        if have is not None and need > 0.9 * have:
            raise ValueError(f"{max_batch} sequences of {self.max_len} tokens need a KV cache of {need / 2**30:.2f} "
                             f"GiB, more than the {have / 2**30:.2f} GiB of memory available on {self.device}: "
                             "lower --max-batch or --context")
        self.cache = RowKVCache(cfg, max_batch, self.max_len, self.model.device, self.model.dtype)
        self.rows: list[_Seq | None] = [None] * max_batch
        # Waiting requests by group, in turn order: the group at the front is admitted next.
        self.groups: dict[asyncio.Queue, collections.deque[Request]] = {}
        self.n_waiting = 0
        self.prefills: collections.deque[_Prefill] = collections.deque()  # prompts going in, in turn
        self.riding: list[_Prefill] = []  # prompts in their rows whose tokens go in with the steps (RIDE_TOKENS)
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.generated, self.peak = 0, 0  # tokens sampled and most rows in use at once, since start (/health)
        self.prompt_tokens = 0  # prompt tokens admitted since start
        self.jobs: collections.deque = collections.deque()  # (run() -> results, their futures), one a turn
        self.observer = None  # first_token(s), token_gap(s): serve/metrics.py's histograms
        self._token_text: dict[int, str] = {}
        # Seconds of the last decode steps of each number of rows (moving averages), and the
        # prefill chunk whose turns cost PREFILL_SHARE of the cheapest, adapted as the loop runs.
        self._step_s: dict[int, float] = {}
        # On a CPU the times are the engine thread's own CPU time: on a shared machine, a step that
        # waited for a core would otherwise swell the budget of the next prefill turns (and so the
        # gaps of every stream). A GPU works apart from this thread: there, wall time.
        self._clock = time.thread_time if self.device.type == "cpu" else time.perf_counter
        self._chunk = min(MIN_CHUNK, prefill_chunk)
        self._prefill_spent = 0.0  # the seconds of the last turn of prefill
        self._allocator = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="slm-prefill-cache",
                                                                initializer=yield_to_the_engine)
        self._worked = False
        # Finished sequences' keys and values, for prompts that start with one (serve/prefix.py).
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.constraints = Constraints(self.tokenizer, self.vocab, self.eos_ids)
        self._token_bytes = kv_cache_bytes(cfg, 1, 1, self.model.dtype)  # one token's keys and values
        self._garbage: list = []  # caches let go of this turn, freed by _free off this thread
        # Each idle row that still holds the sequence a prefix-cache entry was saved from: the
        # entry's key (never reused: a taken or dropped entry matches no prompt). A prompt that
        # continues it goes in there without copying it back.
        self._resident: dict[int, int] = {}
        # LoRA adapters that requests may name (Params.adapter): each row decodes with its own, in
        # the same step as the others (runtime/adapters.py).
        self.adapters = adapters or RowAdapters(self.model)

    # -- called from the event loop ------------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.submit_all([req])

    def submit_all(self, reqs: list[Request]) -> None:
        """Queue the requests of one call, all or none (QueueFull when they do not all fit)."""
        for req in reqs:
            if not req.prompt_ids:
                raise ValueError("the prompt is empty")
            if req.params.adapter is not None and req.params.adapter not in self.adapters.adapters:
                raise ValueError(f"no adapter named {req.params.adapter!r}")
            if len(req.prompt_ids) + req.params.max_tokens > self.max_len:
                raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) plus max_tokens ({req.params.max_tokens}) "
                                 f"must fit the context of {self.max_len} tokens")
            if req.n > self.max_batch:
                raise ValueError(f"n={req.n} is more than the {self.max_batch} sequences this server runs at once")
        if len(reqs) > self.max_waiting:
            raise ValueError(f"{len(reqs)} prompts are more than the {self.max_waiting} this server queues")
        with self.cond:
            if self.n_waiting + len(reqs) > self.max_waiting:
                raise QueueFull(f"{self.n_waiting} requests are already waiting")
            for req in reqs:
                req.engine = self
                self.groups.setdefault(req.queue, collections.deque()).append(req)
            self.n_waiting += len(reqs)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def stats(self) -> dict:
        return {"running": sum(s is not None for s in self.rows),
                "waiting": self.n_waiting + len(self.prefills) + len(self.riding),
                "max_batch": self.max_batch, "context": self.max_len, "generated_tokens": self.generated,
                "peak_running": self.peak, "prompt_tokens": self.prompt_tokens, "prefix_cache": self.prefixes.stats()}

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
        self._allocator.shutdown(wait=False)

    # -- the loop (engine thread) --------------------------------------------------------------
    def _idle(self) -> bool:
        return not self.n_waiting and not self.prefills and not self.riding and not any(self.rows) and not self.jobs

    # -- embeddings: run on the engine thread, between its turns ---------------------------------
    def embed(self, prompts: list[list[int]], adapter: str | None = None) -> list[concurrent.futures.Future]:
        """Mean-pooled, L2-normalised final hidden states of the prompts (what llama.cpp's server
        gives for a decoder model), as futures of fp32 [d] tensors. Computed on the engine thread
        (its OpenMP pool is the process's only one) in batches of at most EMBED_TOKENS padded
        tokens, one batch a turn, so running streams keep their pace."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad little
        futures = [concurrent.futures.Future() for _ in prompts]
        batches, batch = [], []
        for i in order:
            if batch and (len(batch) + 1) * len(prompts[i]) > EMBED_TOKENS:
                batches.append(batch)
                batch = []
            batch.append(i)
        batches.append(batch)
        with self.cond:
            for b in batches:
                self.jobs.append((lambda ps=[prompts[i] for i in b]: self._with_adapter(adapter, len(ps), embed_batch,
                                                                         self.model, ps), [futures[i] for i in b]))
            self.cond.notify()
        return futures

    def prompt_logprobs(self, ids: list[int], k: int, adapter: str | None = None) -> concurrent.futures.Future:
        """A future of the prompt's own tokens' logprobs (`echo` with `logprobs` on completions,
        which evaluation harnesses use for log-likelihoods): each token's TokenLogprob given the ones
        before it, with the top k (the first token's logprob None). On the engine thread."""
        future = concurrent.futures.Future()
        with self.cond:
            self.jobs.append((lambda: [self._with_adapter(adapter, 1, self._prompt_logprobs, ids, k)], [future]))
            self.cond.notify()
        return future

    def _with_adapter(self, adapter: str | None, rows: int, fn, *args):
        """fn(*args) with every one of `rows` batch rows decoding with `adapter` (None: the base)."""
        with self.adapters.applied({adapter: list(range(rows))} if adapter is not None else {}):
            return fn(*args)

    def _prompt_logprobs(self, ids: list[int], k: int) -> list[TokenLogprob]:
        h = self.model(torch.tensor([ids], device=self.device), return_hidden=True)[0]
        out = [TokenLogprob(self.token_text(ids[0]), None, [], 0)]  # nothing before it: no logprob
        offset = len(out[0].token)
        for a in range(0, len(ids) - 1, PROMPT_LOGPROB_ROWS):  # the LM head a few hundred rows at a time
            b = min(a + PROMPT_LOGPROB_ROWS, len(ids) - 1)
            logp = F.log_softmax(self.model.lm_head(h[a:b]).float(), -1)
            tops = logp.topk(k) if k else None
            for j in range(b - a):
                tok = ids[a + j + 1]
                top = [(self.token_text(i), v) for i, v in zip(tops.indices[j].tolist(), tops.values[j].tolist())] \
                    if k else []
                text = self.token_text(tok)
                out.append(TokenLogprob(text, float(logp[j, tok]), top, offset))
                offset += len(text)
        return out

    def _job_turn(self) -> None:
        """One queued job (an embedding batch, a prompt's logprobs) between two decode steps."""
        with self.cond:
            if not self.jobs:
                return
            run, futures = self.jobs.popleft()
        if not all(f.set_running_or_notify_cancel() for f in futures):
            return  # its request went away
        try:
            for f, e in zip(futures, run()):
                f.set_result(e)
        except Exception as e:  # noqa: BLE001 - handed to the waiting request
            for f in futures:
                f.set_exception(e)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                if self._worked and self._idle():  # after a burst: give its memory back
                    self._worked = False
                    release_heap()
                with self.cond:
                    while self.running and self._idle():
                        self.cond.wait()
                    if not self.running:
                        break
                self._worked = True
                try:
                    self._job_turn()
                    self._drop_cancelled()
                    self._prefill()
                    if any(self.rows) or self.riding:
                        self._step()
                    self._free()
                except Exception:  # fail what is in flight, keep serving
                    log.exception("decode step failed")
                    for s in self.rows:
                        if s is not None:
                            self._finish(s, [Delta(s.req.first_index + s.index, finish_reason="error")])
                    while self.prefills:
                        self._fail(self.prefills.popleft())
                    while self.riding:
                        self._fail(self.riding.pop())

    def _drop_cancelled(self) -> None:
        for s in self.rows:
            if s is not None and s.req.cancelled:
                self.rows[s.row] = None
                if s.prompt_cache is not None:
                    self._garbage.append(s.prompt_cache)
                    s.prompt_cache = None
        if any(p.req.cancelled for p in self.prefills):
            self.prefills = collections.deque(p for p in self.prefills if not p.req.cancelled)
        if any(p.req.cancelled for p in self.riding):
            self.riding = [p for p in self.riding if not p.req.cancelled]

    def _next(self, free: int) -> Request | None:
        """The next request to prefill: the first waiting one of the group whose turn it is, which
        then goes to the back of the line. None when that request needs more free rows than there
        are (it keeps its turn: a request with n choices is not overtaken for ever)."""
        with self.cond:
            for group in list(self.groups):
                q = self.groups.pop(group)
                while q and q[0].cancelled:
                    q.popleft()
                    self.n_waiting -= 1
                if not q:
                    continue
                if q[0].n > free:
                    self.groups = {group: q, **self.groups}  # back to the front
                    return None
                req = q.popleft()
                self.n_waiting -= 1
                if q:
                    self.groups[group] = q
                return req
            return None

    def _prefill(self) -> None:
        """Admit waiting requests if rows are free for them, then put one chunk of one prompt
        through the model. The prompts going in take turns chunk by chunk, so a short prompt that
        arrives while a long one is going in is in after a chunk or two, not after the long one.
        A prompt that rides the decode steps (RIDE_TOKENS) takes a turn only to copy its prefix into
        its row; while the turn's budget lasts, the next such prompt copies in the same turn."""
        # One request a turn while rows decode (matching a prompt against the prefix cache and
        # making its cache take a millisecond or more, which every stream would wait for); all that
        # fit while none does (a crowd arriving together then goes in together).
        while self._admit() and not any(self.rows):
            pass
        busy = sum(s is not None for s in self.rows)
        others = busy > 0
        # With rows decoding, a turn of prefill may cost PREFILL_SHARE of a decode step of as many
        # rows as are decoding now; alone, no limit.
        crowd = min(len(self.prefills) + 1, PREFILL_CROWD)
        budget = crowd * PREFILL_SHARE * self._step_time(busy) if others and self._step_s else None
        t = self._clock()
        try:
            self._prefill_turn(others, budget, t)
        finally:
            self._prefill_spent = self._clock() - t  # what the riders of the next step give way to

    def _prefill_turn(self, others: bool, budget: float | None, t: float) -> None:
        while True:
            # Riding prompts first, in the order they came (a turn copies their prefixes); then of the
            # prompts whose cache is ready (with no row decoding, waiting for one costs nothing), the
            # one with the fewest tokens left: a short prompt is in after a turn or two whatever is
            # going in beside it, and a crowd of short prompts starts one by one instead of all of
            # them together after as many turns as they take in all.
            p = next((p for p in self.prefills if p.ride), None)
            if p is None:
                ready = [p for p in self.prefills if p.cache is not None or p.pending.done() or not others]
                if not ready:
                    return
                p = min(ready, key=lambda p: len(p.req.prompt_ids) - p.done)
            self.prefills.remove(p)
            if not p.ride:
                break
            if not self._ride_turn(p, budget, t) or (budget is not None and self._clock() - t >= budget):
                return
        if p.cache is None:
            try:
                p.cache = p.pending.result()
                entry, length = p.prefix
                if p.taken:  # the entry's own cache: it holds the prompt's start already
                    p.done, p.prefix = length, (None, 0)
                elif entry is not None:  # the prompt's start from the prefix cache: prefilled from there
                    p.copy, p.done = PrefixCache.load_layers(entry, length, p.cache), length
                else:
                    p.prefix = (None, 0)
            except Exception:
                log.exception("prefill failed")
                self._fail(p)
                return
        if p.copy is not None:  # keys and values being copied: from the prefix cache, or into its rows
            try:
                copied = self._copy_turn(p, budget, t)
            except Exception:
                log.exception("prefill failed")
                self._fail(p)
                return
            if not copied:
                self.prefills.append(p)
                return
            if p.logits is not None:  # into its rows: the sequences start
                self._start(p)
                return
            p.prefix = (None, 0)  # the copy from the prefix cache is done: its entry may be taken now
        adapter = p.req.params.adapter
        try:
            with self.adapters.applied({adapter: [0]} if adapter is not None else {}):
                ran = self._chunk_turn(p, others, budget, t)
        except Exception:
            log.exception("prefill failed")
            self._fail(p)
            return
        if ran is None:
            self.prefills.append(p)
            return
        logits, n = ran
        p.done += n
        if p.done < len(p.req.prompt_ids):
            self.prefills.append(p)  # to the back: the next prompt's turn
            return
        # The prompt is in: its keys and values go into its rows (the lowest free ones: busy rows
        # stay packed at the front), layer by layer within the turns' budget, then it starts.
        p.logits = logits
        p.copy = (step for row in p.rows for step in self.cache.load_row_layers(row, p.cache))
        if self._copy_turn(p, budget, t):
            self._start(p)
        else:
            self.prefills.append(p)

    def _admit(self) -> bool:
        """Admit the next waiting request if rows are free for it: whether one was."""
        reserved = {r for p in [*self.prefills, *self.riding] for r in p.rows}
        free = [i for i, s in enumerate(self.rows) if s is None and i not in reserved]
        req = self._next(len(free))
        if req is None:
            return False
        # Room for the completion too: the finished sequence stays in it for the prefix cache
        # (mapped pages: the room costs memory only once written).
        need = len(req.prompt_ids) + (req.params.max_tokens if req.n == 1 else 0)
        entry, length = self.prefixes.match(req.prompt_ids, req.params.adapter)
        taken = req.n == 1 and self._can_take(entry, length, need)
        ride = req.n == 1 and req.params.adapter is None and len(req.prompt_ids) - length <= RIDE_TOKENS \
            and len(req.prompt_ids) <= RIDE_CONTEXT and fused_rows(self.model, self.cache) is not None
        # a rider goes into the row its match was saved from if that row still holds it
        home = next((r for r in free if self._resident.get(r) == entry.key), None) \
            if ride and entry is not None else None
        if home is not None:
            free.remove(home)
            free.insert(0, home)
        for r in free[:req.n]:  # rows about to be written
            self._resident.pop(r, None)
        if taken:  # the prompt continues the whole entry, which has room: it goes on in its cache
            self.prefixes.take(entry)
            cache = concurrent.futures.Future()
            cache.set_result(entry.cache)
            self._allocator.submit(populate, entry.cache, need)  # the room it will write
        elif ride:  # made here: on the allocator thread (which yields to this one) it could wait long
            cache = concurrent.futures.Future()
            keep = None  # nowhere to keep the finished sequence without a prefix cache: no cache
            if self.prefixes.budget > 0:
                keep = self.model.new_cache(1, self._room(need), zeros=zeros_without_openmp)
                self._allocator.submit(populate, keep, need)  # its pages faulted in while it decodes
            cache.set_result(keep)
        else:  # the pages its prefix-cache match goes into faulted in there: the copy is turns of this thread
            room = self._room(need) if req.n == 1 else need
            cache = self._allocator.submit(self._populated_cache, room, length)
        self.prefills.append(_Prefill(req, free[:req.n], cache, (entry, length), taken, ride, home is not None))
        self.prompt_tokens += len(req.prompt_ids)
        return True

    def _populated_cache(self, room: int, slots: int) -> KVCache:
        """A batch-1 cache of `room` tokens whose first `slots` slots' pages are faulted in: copying
        a 4,000-token match (128 MB for 8 layers of 512 in fp32) into fresh pages took 60 ms of
        the engine thread's turns, into pages faulted in here before 21 ms (the faults: 40 ms of
        this thread's), where a turn's budget is a few ms."""
        cache = self.model.new_cache(1, room, zeros=zeros_without_openmp)
        if slots:
            populate(cache, slots)
        return cache

    def _ride_turn(self, p: _Prefill, budget: float | None, t: float) -> bool:
        """A riding prompt's turn: the keys and values of its prefix-cache match go into its row
        (all of them if the prompt continues a whole entry), a layer at a time within the turn's
        budget; then it rides the decode steps. Whether it is in (or failed); else it goes on in a
        later turn."""
        try:
            if p.copy is None:  # its first turn
                entry, length = p.prefix
                into_keep = iter(())
                keep = p.pending.result()  # made in _admit
                if entry is not None and not p.taken and keep is not None \
                        and length * self._token_bytes > kv_cache.COPY_SLICE_BYTES:
                    # A long match goes into the cache that will keep the finished sequence now, a
                    # slice a turn, so that keeping it copies only the rest: a 4,000-token match is
                    # ~130 MB for a model of 8 layers of 512, a gap of that many ms in every stream
                    # in one go. A short one is copied with the rest from its row then.
                    into_keep = PrefixCache.load_layers(entry, length, keep)
                if p.home:  # its row holds the match already (`_resident`)
                    self.cache.keep_row(p.rows[0], length)
                    into_row = iter(())
                else:
                    into_row = self.cache.load_row_layers(p.rows[0], entry.cache if entry is not None else None, length)
                p.copy, p.done = itertools.chain(into_keep, into_row), length
            if not self._copy_turn(p, budget, t):
                self.prefills.append(p)
                return False
        except Exception:
            log.exception("prefill failed")
            self._fail(p)
            return True
        p.prefix = (None, 0)  # the entry may be taken or dropped now
        self.riding.append(p)
        return True

    def _room(self, need: int) -> int:
        """Tokens of cache for a prompt of one choice and its completion (`need`): NEXT_TURN_ROOM
        more, within the context, where the layers that keep every position are then mapped
        tensors (zeros_without_openmp) whose room costs no memory until written; else `need`."""
        cfg = self.model.config
        room = max(need, min(self.max_len, need + NEXT_TURN_ROOM))
        per_token = cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=self.model.dtype).element_size()
        return room if self.device.type == "cpu" and per_token * room >= MAPPED_BYTES else need

    def _can_take(self, entry: Entry | None, length: int, need: int) -> bool:
        """Whether a prompt of one choice that starts with `length` tokens of `entry` may go on in
        the entry's own cache: it continues the whole entry, the cache has room for the prompt and
        its completion, and no other prompt is still copying from it (which a ring's new keys
        could overwrite)."""
        return (entry is not None and length == len(entry.tokens) and entry.cache.max_len >= need
                and not any(q.prefix[0] is entry for q in self.prefills))

    def _step_time(self, rows: int) -> float:
        """Seconds of a decode step of `rows` rows: measured, or that of the most rows below it."""
        fewer = [n for n in self._step_s if n <= rows]
        return self._step_s[max(fewer)] if fewer else min(self._step_s.values())

    def _copy_turn(self, p: _Prefill, budget: float | None, t: float) -> bool:
        """Advance p's copy a layer at a time while the turn's budget holds (at least one layer):
        whether it is done."""
        while True:
            a = self._clock()
            try:
                next(p.copy)
            except StopIteration:
                p.copy = None
                return True
            if budget is not None and self._clock() - t + (self._clock() - a) > budget:
                return False

    def _start(self, p: _Prefill) -> None:
        """p's sequences take their rows (loaded) and sample their first tokens."""
        self._advance(self._seat(p), p.logits.expand(p.req.n, -1), list(range(p.req.n)))

    def _seat(self, p: _Prefill) -> list[_Seq]:
        """p's sequences, in their rows (loaded), before their first tokens are sampled."""
        req, seqs = p.req, []
        if p.ride:  # its cache is only where the finished sequence is kept: still being made, maybe
            p.cache = p.pending
        for i, row in enumerate(p.rows):
            seqs.append(_Seq(req, i, row, self.tokenizer, self.vocab, self.device))
            if req.params.grammar is not None:
                seqs[-1].matcher = self.constraints.matcher(req.params.grammar)
            if req.n == 1:
                seqs[-1].prompt_cache = p.cache
            self.rows[row] = seqs[-1]
        return seqs

    def _chunk_turn(self, p: _Prefill, others: bool, budget: float | None, t: float):
        """Put p's next chunk through the model, or as many of its layers as the budget holds:
        (logits of its last position, its tokens) once the chunk is through, else None."""
        if p.parts is None:
            size = self._chunk if others else self.prefill_chunk
            ids = torch.tensor([p.req.prompt_ids[p.done:p.done + size]], device=self.device)
            if budget is None:  # no row is waiting for its next token: the chunk in one go
                logits, n = self.model(ids, cache=p.cache, last_only=True)[:, -1], ids.shape[1]
            else:  # rows are decoding: the chunk goes through as many layers a turn as the budget holds
                p.parts, p.n, p.spent, p.layers = self.model.forward_by_layer(ids, p.cache), ids.shape[1], 0.0, 0
        if p.parts is not None:
            while True:
                try:
                    next(p.parts)
                except StopIteration as done:
                    logits, p.parts, n = done.value[:, -1], None, p.n
                    break
                p.layers += 1
                elapsed = self._clock() - t
                layer_s = (p.spent + elapsed) / p.layers  # what a layer of this chunk costs
                if budget is not None and elapsed + layer_s > budget:  # the next layer would overrun
                    break
            if p.parts is not None:  # the chunk's other layers in its next turns
                p.spent += self._clock() - t
                return None
            if budget is not None:  # the next chunk: one of its layers costs about half a turn
                layer_s = (p.spent + self._clock() - t) / max(p.layers, 1)
                grow = min(1.25, max(0.5, 0.5 * budget / max(layer_s, 1e-6)))
                self._chunk = min(self.prefill_chunk, max(MIN_CHUNK, int(n * grow)))
        return logits, n

    @staticmethod
    def _fail(p: _Prefill) -> None:
        p.req._push([Delta(p.req.first_index + i, finish_reason="error") for i in range(p.req.n)])

    def _step(self) -> None:
        """One decode step: every busy row's next token, and the next tokens of the prompts riding
        in (as many as _ride_room gives). A prompt whose last token goes in samples its first
        token with the rows."""
        t = self._clock()
        busy = [s for s in self.rows if s is not None]
        self.peak = max(self.peak, len(busy) + sum(p.req.n for p in self.prefills) + len(self.riding))  # rows in use
        # each row's tokens this step at their positions: a busy row's next token, a rider's next few
        steps: dict[int, tuple[list[int], list[int]]] = {s.row: ([s.tokens[-1]], [s.pos]) for s in busy}
        room, riders, starting = self._ride_room(len(busy)), [], []
        for p in self.riding:
            k = min(len(p.req.prompt_ids) - p.done, room)
            if k <= 0:
                break
            steps[p.rows[0]] = (p.req.prompt_ids[p.done:p.done + k], list(range(p.done, p.done + k)))
            riders.append(p.rows[0])
            p.done, room = p.done + k, room - k
            if p.done == len(p.req.prompt_ids):
                starting.append(p)
        for s in busy:
            s.pos += 1
        adapted: dict[str, list[int]] = {}  # each adapter's rows
        for s in busy:
            if s.req.params.adapter is not None:
                adapted.setdefault(s.req.params.adapter, []).append(s.row)
        if riders and fused_rows(self.model, self.cache) is None:  # cannot happen while the model is unchanged
            raise RuntimeError("prompts are riding the decode steps, but the fused decoder no longer runs them")
        if adapted and riders:  # the adapters' rows on the module path, one token a row; the riders apart
            rows = [s.row for s in busy]
            on_rows = self._rows_forward({r: steps[r] for r in rows}, adapted)
            logits = on_rows.new_empty(max(steps) + 1, on_rows.shape[-1])
            logits[rows] = on_rows[rows]
            logits[riders] = self._rows_forward({r: steps[r] for r in riders}, {})[riders]
        else:
            logits = self._rows_forward(steps, adapted)
        if starting:
            self.riding = [p for p in self.riding if p not in starting]
        seqs = busy + [s for p in starting for s in self._seat(p)]
        if seqs:
            self._advance(seqs, logits, [s.row for s in seqs])
        took = self._clock() - t
        n = sum(len(ids) for ids, _ in steps.values())
        was = self._step_s.get(n)
        self._step_s[n] = took if was is None else 0.8 * was + 0.2 * took

    def _ride_room(self, busy: int) -> int:
        """The prompt tokens a step of `busy` decoding rows may carry (RIDE_SHARE): the turn's
        prefill and the riders together slow the running streams by about that share."""
        if not busy or not self._step_s:
            return self.prefill_chunk
        step = self._step_time(busy)
        room = int((RIDE_SHARE * step - self._prefill_spent) / self._token_time())
        return max(1 if self._prefill_spent > 0.1 * step else RIDE_MIN_TOKENS, room)

    def _token_time(self) -> float:
        """Seconds one more token adds to a decode step: the slope between the steps of the fewest
        and the most tokens measured, or a step's time per token while only one size has run."""
        least, most = min(self._step_s), max(self._step_s)
        if most > least:
            slope = (self._step_s[most] - self._step_s[least]) / (most - least)
            if slope > 0:
                return slope
        return self._step_s[most] / most

    def _rows_forward(self, steps: dict[int, tuple[list[int], list[int]]],
                      adapted: dict[str, list[int]]) -> torch.Tensor:
        """The logits [rows, V] of each row's last token this step (row r's in row r), through one
        forward of the model over the cache's first rows: steps maps a row to its tokens and their
        positions (one, or a rider's several: right-aligned, the padding before them at position
        -1, so that each row's last token is the forward's last column); rows past the last one
        given are not computed, those between are idle (-1) and their logits are not to be read
        (zeros from the decoder, whatever the modules made of the padding on the module path)."""
        B, T = max(steps) + 1, max(len(ids) for ids, _ in steps.values())
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.full((B, T), -1, dtype=torch.long)
        for row, (tokens, at) in steps.items():
            ids[row, T - len(tokens):], pos[row, T - len(at):] = torch.tensor(tokens), torch.tensor(at)
        with self.adapters.applied(adapted):
            return self.model(ids.to(self.device), cache=self.cache, pos=pos.to(self.device), last_only=True)[:, -1]

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor, rows: list[int]) -> None:
        """Sample one token for each sequence from its row of logits and send what it produced."""
        x = logits if rows == list(range(logits.shape[0])) else logits[rows]
        bound = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if bound:  # what the grammars allow, the rest at -inf
            allowed = self.constraints.allowed([seqs[i].matcher for i in bound]).to(x.device)
            sampled_from = x.float().clone()
            sampled_from[bound] = sampled_from[bound].masked_fill(~allowed, float("-inf"))
        toks = sample_rows(sampled_from if bound else x, [s.sampler for s in seqs])
        for i in bound:
            s = seqs[i]
            s.matcher.consume_token(toks[i])
            s.complete = s.matcher.is_stopped()
        lps: list[TokenLogprob | None] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.req.params.logprobs is not None]
        if want:  # logprobs are the model's own distribution (raw logits), as vLLM reports by default
            logp = F.log_softmax(x[want].float(), -1)
            for j, i in enumerate(want):
                lps[i] = self._logprob(logp[j], toks[i], seqs[i].req.params.logprobs, seqs[i])
        if self.observer is not None:
            now = time.perf_counter()
            for s in seqs:
                if s.last is None:
                    self.observer.first_token(now - s.req.created)
                else:
                    self.observer.token_gap(now - s.last)
                s.last = now
        out: dict[Request, list[Delta]] = {}
        finished: list[_Seq] = []
        for s, tok, lp in zip(seqs, toks, lps):
            self.generated += 1
            s.tokens.append(tok)
            s.req.completion_tokens[s.index] += 1
            d = self._delta(s, tok, lp)
            out.setdefault(s.req, []).append(d)
            if d.finish_reason:
                finished.append(s)
        push_all(out)
        # Then the finished sequences go to the prefix cache: saving one copies its keys and values
        # into pages touched for the first time (~25 ms for 700 tokens of a 512-wide model), which
        # its last token does not wait for.
        for s in finished:
            self.rows[s.row] = None
            try:
                self._keep(s)
            except Exception:  # noqa: BLE001 - its reply is complete; the cache only misses it
                log.exception("keeping a finished sequence for the prefix cache failed")

    def _delta(self, s: _Seq, tok: int, lp: TokenLogprob | None) -> Delta:
        d = Delta(s.req.first_index + s.index, logprobs=[lp] if lp else [])
        if tok in self.eos_ids:
            d.text, d.finish_reason = s.text.flush(), "stop"
        else:
            d.text, stopped = s.text.add(tok)
            if stopped or s.complete:
                d.text, d.finish_reason = d.text + (s.text.flush() if s.complete else ""), "stop"
            elif len(s.tokens) >= s.req.params.max_tokens:
                d.text, d.finish_reason = d.text + s.text.flush(), "length"
        return d

    def _keep(self, s: _Seq) -> None:
        """Put a finished sequence in the prefix cache: its generated tokens' keys and values
        (all fed but the last) go from its row into its prompt's cache, which has room for them."""
        cache, s.prompt_cache = s.prompt_cache, None
        if isinstance(cache, concurrent.futures.Future):  # a riding prompt's, made on the allocator thread
            if not cache.done():  # not yet (a busy allocator): the sequence is not kept, nor waited for
                self._garbage.append(cache)
                return
            try:
                cache = cache.result()
            except Exception:  # noqa: BLE001 - its reply is complete; the prefix cache only misses it
                log.exception("allocating a cache to keep a sequence in failed")
                return
        if cache is None:
            return
        if self.prefixes.budget > 0:
            self.cache.save_row(s.row, cache, s.pos)
            kept = self.prefixes.add(s.req.prompt_ids + s.tokens[:-1], cache, self._token_bytes, s.req.params.adapter)
            if kept is not None:
                self._resident[s.row] = kept.key
                return
        self._garbage.append(cache)

    def _free(self) -> None:
        """Free the caches let go of this turn on the allocator thread: unmapping a long prompt's
        (~180 MB for 4,000 SmolLM2 tokens) takes ~20 ms, a gap that long in every stream if the
        engine thread dropped the last reference itself."""
        garbage = self._garbage + self.prefixes.dropped
        if garbage:
            self._garbage, self.prefixes.dropped = [], []
            self._allocator.submit(garbage.clear)  # the work item then holds the only reference

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
