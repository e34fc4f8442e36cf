"""The continuous-batching engine on its own: requests joining and leaving a running batch give
exactly what each gives alone (also through sliding-window caches, and with prompts prefilled in
chunks), seeded sampling does not depend on the batch, penalties follow OpenAI's definition, a
cancelled request stops computing, the groups of requests take turns for rows, and a cache too
large for memory is refused before it is allocated."""

import asyncio
import math
import os
import time

import pytest
import torch

import slm
from support.models import FAMILIES, make_checkpoint
from slm.runtime.generate import stream_text
from slm.serve.engine import Engine, Params, QueueFull, Request, deltas


async def run(engine: Engine, jobs, stagger: float = 0.0) -> list[list[str]]:
    """Submit (prompt_ids, Params, n) jobs, `stagger` seconds apart; return each job's texts."""
    reqs, tasks = [], []

    async def consume(r):
        texts = [""] * r.n
        async for d in deltas([r]):
            texts[d.index] += d.text
        return texts

    for ids, p, n in jobs:
        r = Request(ids, p, n)
        engine.submit(r)
        reqs.append(r)
        tasks.append(asyncio.ensure_future(consume(r)))
        await asyncio.sleep(stagger)
    return list(await asyncio.gather(*tasks))


def serve(lm, jobs, max_batch=3, stagger=0.0, prefill_chunk=512):
    engine = Engine(lm, max_batch=max_batch, max_len=128, prefill_chunk=prefill_chunk)
    engine.start()
    try:
        return asyncio.run(run(engine, jobs, stagger)), engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tokenizer_dir):
    return slm.load(make_checkpoint(str(tmp_path_factory.mktemp("engine")), "llama", tokenizer_dir))


@pytest.mark.parametrize("family,quantize,chunk", [
    ("llama-untied", None, 512), ("mistral-gqa", None, 512), ("gemma3", None, 512), ("gemma3", "int4", 512),
    ("phi", "int8", 512), ("llama-untied", None, 7), ("mistral-gqa", None, 7), ("gemma3", None, 3)])
def test_batched_greedy_equals_alone(family, quantize, chunk, tmp_path, tokenizer_dir):
    """6 requests through 3 rows: later ones join a running batch as rows free up; prompts and
    generations longer than the sliding windows (16 for Mistral, 8 for Gemma) roll the cache.
    Quantized models too (embedding included: the engine takes the model's dtype, not the table's).
    With a small prefill chunk the prompts go in several pieces, across the windows' edges."""
    fam, kw = FAMILIES[family]
    lm = slm.load(make_checkpoint(str(tmp_path / "m"), fam, tokenizer_dir, **kw), quantize=quantize)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (4, 30, 11, 2, 19, 7)]
    lengths = [25, 9, 40, 17, 30, 12]
    jobs = [(p, Params(max_tokens=m, temperature=0), 1) for p, m in zip(prompts, lengths)]
    out, engine = serve(lm, jobs, max_batch=3, stagger=0.01, prefill_chunk=chunk)
    for (p, m), (text,) in zip(zip(prompts, lengths), out):
        assert text == "".join(lm.stream(p, max_new_tokens=m, temperature=0))
    assert engine.generated == sum(lengths)  # random weights: no EOS within these lengths


@pytest.mark.parametrize("family", ["llama-untied", "gemma3"])
def test_prefill_spread_over_turns_layer_by_layer_equals_alone(family, tmp_path, tokenizer_dir, monkeypatch):
    """With no time for prefill beside the decode steps (PREFILL_SHARE 0), every chunk after a
    prompt's first goes in one layer a turn (Transformer.forward_by_layer) while other rows
    decode: the text is still what each prompt gives alone."""
    from slm.serve import engine as engine_module
    calls = []
    monkeypatch.setattr(engine_module, "PREFILL_SHARE", 0.0)
    monkeypatch.setattr(engine_module, "RIDE_TOKENS", 0)  # short prompts would ride the steps instead
    fam, kw = FAMILIES[family]
    lm = slm.load(make_checkpoint(str(tmp_path / "m"), fam, tokenizer_dir, **kw))
    by_layer = lm.model.forward_by_layer
    monkeypatch.setattr(lm.model, "forward_by_layer", lambda *a: calls.append(1) or by_layer(*a))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (3, 60, 45)]
    lengths = (120, 10, 12)  # the first still decodes while the others go in
    jobs = [(p, Params(max_tokens=m, temperature=0), 1) for p, m in zip(prompts, lengths)]
    out, _ = serve(lm, jobs, max_batch=3, stagger=0.005)
    for (p, m), (text,) in zip(zip(prompts, lengths), out):
        assert text == "".join(lm.stream(p, max_new_tokens=m, temperature=0))
    assert calls, "no chunk went in layer by layer"


def test_seeded_sampling_does_not_depend_on_the_batch(lm):
    ids = lm.tokenizer.encode("Once upon a time")
    p = Params(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    (alone,), _ = serve(lm, [(ids, p, 2)])
    others = [(lm.tokenizer.encode(f"The cat {i}"), Params(max_tokens=30, temperature=0.8, seed=i), 1) for i in range(4)]
    batched, _ = serve(lm, others[:2] + [(ids, p, 2)] + others[2:], max_batch=8)
    assert batched[2] == alone
    assert alone[0] != alone[1]  # n choices sample differently
    (other_seed,), _ = serve(lm, [(ids, Params(max_tokens=20, temperature=1.0, top_p=0.9, seed=8), 2)])
    assert other_seed != alone


def test_penalties_follow_openai(lm):
    """logits - frequency * count - presence * (count > 0), over the generated tokens, then greedy."""
    ids = lm.tokenizer.encode("Once upon a time")
    p = Params(max_tokens=15, temperature=0, presence_penalty=0.7, frequency_penalty=1.3)
    toks, counts = list(ids), torch.zeros(lm.model.lm_head.weight.shape[0])
    with torch.no_grad():
        for _ in range(15):
            x = lm.model(torch.tensor([toks]))[0, -1]
            t = int((x - 1.3 * counts - 0.7 * (counts > 0).float()).argmax())
            toks.append(t)
            counts[t] += 1
    (text,), _ = serve(lm, [(ids, p, 1)])
    assert text[0] == "".join(stream_text(lm.tokenizer, iter(toks[len(ids):]), [], set()))
    (plain,), _ = serve(lm, [(ids, Params(max_tokens=15, temperature=0), 1)])
    assert plain != text


def test_cancel_frees_the_row(lm):
    engine = Engine(lm, max_batch=2, max_len=256)
    engine.start()

    async def go():
        r = Request(lm.tokenizer.encode("Once"), Params(max_tokens=200, temperature=0), 1)
        engine.submit(r)
        async for _ in deltas([r]):
            break
        r.cancel()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if engine.stats()["running"] == 0:
                break
        return engine.stats()
    try:
        stats = asyncio.run(go())
    finally:
        engine.stop()
    assert stats["running"] == 0 and stats["generated_tokens"] < 200


@pytest.mark.parametrize("family", ["llama-untied", "mistral-gqa", "gemma3"])
def test_chunked_prefill_equals_one_shot(family, tmp_path, tokenizer_dir):
    """A prompt fed in chunks (of 1, 5 and 13 tokens, crossing the sliding windows of 16 and 8)
    gives the logits of every position and the cache that one forward over it gives."""
    fam, kw = FAMILIES[family]
    model = slm.load(make_checkpoint(str(tmp_path / "m"), fam, tokenizer_dir, **kw)).model
    ids = torch.randint(5, 400, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model.new_cache(1, 40)
        want = model(ids, cache=whole)
        for chunk in (1, 5, 13):
            cache = model.new_cache(1, 40)
            got = torch.cat([model(ids[:, i:i + chunk], cache=cache) for i in range(0, 40, chunk)], 1)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            for a, b in zip(cache.k + cache.v, whole.k + whole.v):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
            assert all(torch.equal(cache.pos[w], whole.pos[w]) for w in whole.pos)


def test_groups_take_turns(lm):
    """A call with 6 prompts is queued first, then two single requests: with 2 rows, the single
    requests are admitted after one prompt of the big call, not after all six."""
    engine = Engine(lm, max_batch=2, max_len=128)
    order = []

    async def go():
        big = asyncio.Queue()
        p = Params(max_tokens=4, temperature=0)
        reqs = [Request(lm.tokenizer.encode(f"Story {i}"), p, 1, big, i) for i in range(6)]
        singles = [Request(lm.tokenizer.encode(f"Cat {i}"), p, 1) for i in range(2)]
        engine.submit_all(reqs)
        for r in singles:
            engine.submit(r)
        engine.start()  # everything queued before the loop runs: the order is the scheduler's alone

        async def firsts(rs, name):  # the order in which choices get their first token
            seen = set()
            async for d in deltas(rs):
                if d.index not in seen:
                    seen.add(d.index)
                    order.append(f"{name}{d.index}")
        await asyncio.gather(firsts(reqs, "big"), *(firsts([r], f"single{i}.") for i, r in enumerate(singles)))
    try:
        asyncio.run(go())
    finally:
        engine.stop()
    # turns: big, single0, single1 (big went to the back of the line), then big's other prompts
    assert order == ["big0", "single0.0", "single1.0"] + [f"big{i}" for i in range(1, 6)]


def test_a_queue_of_one_call_is_all_or_nothing(lm):
    engine = Engine(lm, max_batch=2, max_len=128, max_waiting=4)

    async def go():
        p = Params(max_tokens=4, temperature=0)
        engine.submit_all([Request([5, 6], p) for _ in range(3)])
        with pytest.raises(QueueFull):
            engine.submit_all([Request([5, 6], p) for _ in range(2)])
        assert engine.stats()["waiting"] == 3
        with pytest.raises(ValueError, match="5 prompts are more than the 4"):
            engine.submit_all([Request([5, 6], p) for _ in range(5)])
    asyncio.run(go())


def test_refuses_a_cache_larger_than_memory(lm, monkeypatch):
    from slm.serve import engine as mod
    need = mod.kv_cache_bytes(lm.model.config, 100_000, 128, lm.model.dtype)
    cfg = lm.model.config
    assert need == 2 * 100_000 * cfg.num_kv_heads * cfg.head_dim * cfg.num_layers * 128 * 4
    monkeypatch.setattr(mod, "available_memory", lambda device: need // 2)
    with pytest.raises(ValueError, match="lower --max-batch or --context"):
        Engine(lm, max_batch=100_000, max_len=128)
    for bad in (dict(max_batch=0), dict(max_batch=2, max_len=0), dict(max_batch=2, prefill_chunk=0)):
        with pytest.raises(ValueError, match="at least 1"):
            Engine(lm, **bad)


def test_a_long_prefill_goes_in_chunks_between_decode_steps(lm):
    """While a row decodes, a 120-token prompt goes in as several chunks, each followed by a decode
    step of the running row: the stream is never held for the whole prefill. Alone, the same
    prompt goes in as one chunk (the most a forward takes)."""
    engine = Engine(lm, max_batch=2, max_len=256, prefill_chunk=512)
    events = []
    prefill, step = engine._prefill, engine._step

    def traced_prefill():  # recorded before it runs: its last chunk wakes the client
        if engine.prefills or engine.n_waiting:
            events.append("prefill")
        prefill()

    def traced_step():
        events.append("step")
        step()
    engine._prefill, engine._step = traced_prefill, traced_step
    engine.start()
    long_prompt = torch.randint(5, 400, (120,), generator=torch.Generator().manual_seed(2)).tolist()

    async def go():
        stream = Request(lm.tokenizer.encode("Once upon a time"), Params(max_tokens=150, temperature=0), 1)
        engine.submit(stream)
        it = deltas([stream]).__aiter__()
        await it.__anext__()  # the stream is decoding
        events.clear()
        long = Request(long_prompt, Params(max_tokens=1, temperature=0), 1)
        engine.submit(long)
        async for _ in deltas([long]):
            pass
        during = list(events)
        stream.cancel()
        await asyncio.sleep(0.05)
        events.clear()
        alone = Request(long_prompt, Params(max_tokens=1, temperature=0), 1)
        engine.submit(alone)
        async for _ in deltas([alone]):
            pass
        return during, list(events)
    try:
        during, alone = asyncio.run(go())
    finally:
        engine.stop()
    chunks = during.count("prefill")
    assert chunks >= 3, during  # several chunks, from MIN_CHUNK up
    assert "prefill,prefill" not in ",".join(during), during  # a decode step after every chunk
    assert alone.count("prefill") == 1, alone


def test_a_short_prompt_is_not_held_up_behind_a_long_prefill(lm):
    """A 200-token prompt goes in chunk by chunk while a row decodes; a short prompt submitted
    just after it takes turns with it and gets its first token before the long prompt does."""
    engine = Engine(lm, max_batch=3, max_len=256)
    engine.start()
    firsts = []

    async def first(r, name):
        async for _ in deltas([r]):
            firsts.append(name)
            return

    async def go():
        stream = Request(lm.tokenizer.encode("Once upon a time"), Params(max_tokens=200, temperature=0), 1)
        engine.submit(stream)
        it = deltas([stream]).__aiter__()
        await it.__anext__()  # the stream is decoding: prefill goes in chunks
        long = Request(torch.randint(5, 400, (200,), generator=torch.Generator().manual_seed(3)).tolist(),
                       Params(max_tokens=1, temperature=0), 1)
        short = Request(lm.tokenizer.encode("The cat"), Params(max_tokens=1, temperature=0), 1)
        engine.submit(long)
        engine.submit(short)
        await asyncio.gather(first(long, "long"), first(short, "short"))
        stream.cancel()
    try:
        asyncio.run(go())
    finally:
        engine.stop()
    assert firsts == ["short", "long"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prompt_caches_are_zeroed_without_openmp(dtype):
    """The allocator thread's prompt caches (engine.zeros_without_openmp): zeros as torch.zeros
    gives them, of any dtype, writable, and a KVCache built with them works as one."""
    from slm.model import KVCache
    from slm.model.config import ModelConfig
    from slm.serve.engine import zeros_without_openmp
    t = zeros_without_openmp((2, 3, 50, 8), dtype=dtype)
    assert t.dtype == dtype and t.shape == (2, 3, 50, 8) and t.is_contiguous() and not t.any()
    t[1, 2, 49, 7] = 1.5
    assert t.sum().item() == 1.5
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    a, b = KVCache(cfg, 1, 40, dtype=dtype), KVCache(cfg, 1, 40, dtype=dtype, zeros=zeros_without_openmp)
    assert all(torch.equal(x, y) for x, y in zip(a.k + a.v, b.k + b.v))


def test_large_prompt_caches_are_mapped_not_cleared():
    """Prompt caches are anonymous mappings: made in the allocator thread, they cost no memory and
    no time until the prefill writes them, however many came before (calloc served them from the
    thread's heap after a few prompts and cleared them: ~170 MB written and 20-80 ms of a core for
    each 4,000-token SmolLM2 prompt, the running streams' largest gap); zero and writable."""
    import threading

    from slm.serve.engine import MAPPED_BYTES, zeros_without_openmp

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    shape = (1, 3, 4000, 64)  # one layer's keys of such a prompt: 3 MB
    assert 4 * math.prod(shape) >= MAPPED_BYTES
    grown = []

    def allocate():  # as the engine's allocator thread does, prompt after prompt
        for _ in range(5):
            before = resident()
            ts = [zeros_without_openmp(shape) for _ in range(60)]
            grown.append(resident() - before)
            ts[-1][0, 2, -1, 63] = 2.0
            assert ts[-1].is_contiguous() and ts[-1].sum().item() == 2.0 and not ts[0].any()
            del ts
    t = threading.Thread(target=allocate)
    t.start()
    t.join()
    assert len(grown) == 5 and max(grown) < 32 * 2**20, grown


@pytest.mark.parametrize("family", ["llama-untied", "gemma3"])
def test_short_prompts_ride_the_decode_steps(family, tmp_path, tokenizer_dir, monkeypatch):
    """While a stream decodes, prompts with few tokens left after their prefix-cache match go in as
    extra tokens of their rows in the decode steps (chunked prefill), a few a step: a new one, one
    that continues a finished sequence (its keys and values copied into its row), and one longer than
    RIDE_TOKENS, which goes through a batch-1 cache layer by layer as before. Each gives what it
    gives alone (Gemma 3's rings wrap inside the steps' chunks), and the finished riders are kept
    for the prefix cache as the others are."""
    import slm.serve.engine as engine_mod
    monkeypatch.setattr(engine_mod, "RIDE_SHARE", 0.0)  # RIDE_MIN_TOKENS a step: every prompt takes several
    fam, kw = FAMILIES[family]
    lm = slm.load(make_checkpoint(str(tmp_path / "m"), fam, tokenizer_dir, **kw))
    engine = Engine(lm, max_batch=4, max_len=160)
    chunks, by_layer = [], []  # the most tokens of a row in each step
    rows_forward = engine._rows_forward
    engine._rows_forward = lambda steps, adapted: chunks.append(max(len(ids) for ids, _ in steps.values())) or \
        rows_forward(steps, adapted)
    forward_by_layer = lm.model.forward_by_layer
    monkeypatch.setattr(lm.model, "forward_by_layer", lambda *a: by_layer.append(1) or forward_by_layer(*a))
    g = torch.Generator().manual_seed(5)
    new = lambda n: torch.randint(5, 400, (n,), generator=g).tolist()  # noqa: E731
    first = new(18)
    greedy = lambda ids, n: "".join(lm.stream(ids, max_new_tokens=n, temperature=0))  # noqa: E731
    engine.start()
    try:
        (text,), = asyncio.run(run(engine, [(first, Params(max_tokens=6, temperature=0), 1)]))
        assert text == greedy(first, 6) and not by_layer
        from slm.runtime.generate import generate_ids
        reply = [step[0] for step in generate_ids(lm.model, [first], 6)]
        # the first sequence and more (Gemma 3's rings have wrapped: only a whole entry serves)
        stream, shared, long = new(3), first + reply + new(7), new(engine_mod.RIDE_TOKENS + 5)
        jobs = [(new(21), Params(max_tokens=8, temperature=0), 1), (shared, Params(max_tokens=8, temperature=0), 1),
                (long, Params(max_tokens=8, temperature=0), 1)]

        async def go():  # the others arrive once the stream decodes
            r = Request(stream, Params(max_tokens=150, temperature=0))
            engine.submit(r)
            texts = deltas([r])
            text = (await texts.__anext__()).text
            others = asyncio.ensure_future(run(engine, jobs))
            async for d in texts:
                text += d.text
            return text, await others
        text, out = asyncio.run(go())
        assert text == greedy(stream, 150)
        for (ids, p, _), (text,) in zip(jobs, out):
            assert text == greedy(ids, p.max_tokens)
        stats = engine.stats()["prefix_cache"]
        assert stats["hits"] >= 1 and stats["hit_tokens"] >= len(first) + len(reply) - 1
        assert stats["entries"] >= 4  # the riders' sequences were kept too
    finally:
        engine.stop()
    # a row's tokens a few a step beside the stream (one after a turn of the long prompt's layers)
    assert chunks[0] == len(first), chunks  # alone: in one step
    assert engine_mod.RIDE_MIN_TOKENS in chunks and max(chunks[1:]) <= max(len(stream), engine_mod.RIDE_MIN_TOKENS), \
        chunks
    assert by_layer, "the long prompt did not go in layer by layer"


@pytest.mark.parametrize("room", [False, True])
@pytest.mark.parametrize("family", ["llama-untied", "mistral-gqa", "gemma3"])
def test_a_chat_reuses_its_history_from_the_prefix_cache(family, room, tmp_path, tokenizer_dir, monkeypatch):
    """Four turns of a chat, each prompt the last one plus its reply plus a new message: each turn
    after the first takes the whole earlier conversation from the prefix cache (the prompt and
    all of the reply but its last token, which was never fed) and gives what the prompt gives
    alone. Mistral (window 16) and Gemma 3 (window 8) wrap their rings, so only whole entries
    serve; a prompt that shares just the first message then misses, where Llama reuses it.
    room: every prompt cache is mapped (as a real model's are), so it has NEXT_TURN_ROOM tokens
    of room and each next turn goes on in the entry's own cache, taken with no copy; without it
    (a tiny model's caches come from the heap) the history is copied into a new cache. Each turn
    rides into the row the conversation was saved from, which still holds it: nothing is copied
    back into a row."""
    import slm.serve.engine as engine_mod
    from slm.runtime.generate import generate_ids
    if room:
        monkeypatch.setattr(engine_mod, "MAPPED_BYTES", 0)
    fam, kw = FAMILIES[family]
    lm = slm.load(make_checkpoint(str(tmp_path / "m"), fam, tokenizer_dir, **kw))
    g = torch.Generator().manual_seed(1)
    new = lambda n: torch.randint(5, 400, (n,), generator=g).tolist()  # noqa: E731
    engine = Engine(lm, max_batch=2, max_len=128)
    taken, copied = [], []
    take = engine.prefixes.take
    engine.prefixes.take = lambda entry: taken.append(entry) or take(entry)
    load_row_layers = engine.cache.load_row_layers
    engine.cache.load_row_layers = lambda row, src, n=None: (copied.append(n) if src is not None else None) or \
        load_row_layers(row, src, n)
    engine.start()
    try:
        prompt, expect_hit = new(12), 0
        for turn in range(4):
            (text,), = asyncio.run(run(engine, [(prompt, Params(max_tokens=10, temperature=0), 1)]))
            assert text == "".join(lm.stream(prompt, max_new_tokens=10, temperature=0))
            stats = engine.stats()["prefix_cache"]
            assert (stats["hits"], stats["hit_tokens"]) == (turn, expect_hit)
            hit_so_far = expect_hit
            reply = [step[0] for step in generate_ids(lm.model, [prompt], 10)]
            expect_hit += len(prompt) + len(reply) - 1
            prompt = prompt + reply + new(5)
        first_message = prompt[:12] + new(6)
        (text,), = asyncio.run(run(engine, [(first_message, Params(max_tokens=5, temperature=0), 1)]))
        assert text == "".join(lm.stream(first_message, max_new_tokens=5, temperature=0))
        stats = engine.stats()["prefix_cache"]
        wrapped = family != "llama-untied"
        assert (stats["hits"], stats["hit_tokens"]) == ((3, hit_so_far) if wrapped else (4, hit_so_far + 12)), stats
        assert 0 < stats["bytes"] <= stats["budget_bytes"]
        assert len(taken) == (3 if room else 0)  # the last prompt shares only the first message: copied
        assert not copied, copied
    finally:
        engine.stop()


def test_a_row_written_since_is_not_taken_for_the_history_it_held(tmp_path, tokenizer_dir):
    """A chat's next turn goes into the row its history was saved from only while that row holds
    it: once another prompt has taken the row (one of two choices, whose sequences are not kept for
    the prefix cache), the history is copied from the prefix cache into whichever row the turn
    gets, and the turn gives what its prompt gives alone."""
    fam, kw = FAMILIES["llama-untied"]
    lm = slm.load(make_checkpoint(str(tmp_path / "m"), fam, tokenizer_dir, **kw))
    g = torch.Generator().manual_seed(3)
    new = lambda n: torch.randint(5, 400, (n,), generator=g).tolist()  # noqa: E731
    engine = Engine(lm, max_batch=2, max_len=128)
    copied = []
    load_row_layers = engine.cache.load_row_layers
    engine.cache.load_row_layers = lambda row, src, n=None: (copied.append((row, n)) if src is not None else None) or \
        load_row_layers(row, src, n)
    greedy = lambda ids, n: "".join(lm.stream(ids, max_new_tokens=n, temperature=0))  # noqa: E731
    engine.start()
    try:
        first = new(12)
        (text,), = asyncio.run(run(engine, [(first, Params(max_tokens=6, temperature=0), 1)]))
        assert text == greedy(first, 6)
        other = new(20)  # two choices, into rows 0 (the chat's: the lowest free) and 1; not kept
        texts, = asyncio.run(run(engine, [(other, Params(max_tokens=6, temperature=0), 2)]))
        assert list(texts) == [greedy(other, 6)] * 2
        copied.clear()  # (its prompt, prefilled apart, copied into both rows)
        from slm.runtime.generate import generate_ids
        turn = first + [step[0] for step in generate_ids(lm.model, [first], 6)] + new(5)
        (text,), = asyncio.run(run(engine, [(turn, Params(max_tokens=6, temperature=0), 1)]))
        assert text == greedy(turn, 6)
        assert copied == [(0, len(first) + 5)], copied  # the history (its last reply token unfed) copied back
    finally:
        engine.stop()


def test_prefix_cache_keeps_to_its_budget_and_drops_what_it_extends():
    """Entries beyond the budget go least recently used first; an entry that a new one extends
    (its tokens a prefix of the new one's) goes at once; a match needs a token left to prefill."""
    from slm.model import KVCache
    from slm.model.config import ModelConfig
    from slm.serve.prefix import PrefixCache
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)

    def filled(n):
        c = KVCache(cfg, 1, n)
        c.seen = n
        return c
    pc = PrefixCache(budget=30 * 100)
    pc.add([1, 2, 3], filled(3), 100)
    pc.add([1, 2, 3, 4, 5], filled(5), 100)  # extends [1, 2, 3]
    assert [list(e.tokens) for e in pc.entries.values()] == [[1, 2, 3, 4, 5]] and pc.nbytes == 500
    assert pc.match([1, 2, 3, 4, 5])[1] == 4  # the last prompt token is prefilled for its logits
    assert pc.match([1, 2, 9])[1] == 2 and pc.match([7, 1])[0] is None
    pc.add(list(range(10, 30)), filled(20), 100)
    pc.add(list(range(40, 50)), filled(10), 100)  # 500 + 2,000 + 1,000 > 3,000: the oldest goes
    assert [len(e.tokens) for e in pc.entries.values()] == [20, 10] and pc.nbytes == 3000
    pc.match(list(range(10, 15)))  # used: now the most recent
    pc.add([60, 61, 62], filled(3), 100)
    assert [len(e.tokens) for e in pc.entries.values()] == [20, 3]
    pc.add(list(range(31)), filled(31), 100)  # alone over the budget: not kept
    assert pc.nbytes == 2300 and (pc.hits, pc.misses) == (3, 1)


def test_prefix_cache_index_finds_what_comparing_every_entry_finds():
    """The index (block hashes of 16 tokens) gives the match that comparing the prompt with every
    entry gives: the longest usable prefix of the same adapter, a ringed entry only whole, the
    first stored of those sharing as much; and it drops exactly the entries a new one extends.
    Random prompts built from shared stems, so that many entries share many blocks."""
    import random
    from slm.model import KVCache
    from slm.model.config import ModelConfig
    from slm.serve.prefix import PrefixCache
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      sliding_window=40)
    rng = random.Random(0)
    stems = [[rng.randrange(6) for _ in range(rng.choice([0, 5, 16, 31, 32, 48, 70]))] for _ in range(6)]

    def tokens():
        out = list(rng.choice(stems))
        return out + [rng.randrange(4) for _ in range(rng.randrange(1, 40))]

    def filled(n):
        c = KVCache(cfg, 1, max(n, 80))  # over 40 tokens, the sliding layer's ring has wrapped
        c.seen = n
        return c

    pc, kept = PrefixCache(budget=10**9), []  # kept: (tokens, adapter, entry), oldest first
    for step in range(400):
        t, adapter = tokens(), rng.choice([None, None, "a"])
        if step % 3 == 0:
            whole = filled(len(t)).size[40] < len(t)
            kept = [(u, a, e) for u, a, e in kept
                    if not (a == adapter and len(u) <= len(t) and u == t[:len(u)] and (len(u) == len(t) or not whole))]
            pc.add(t, filled(len(t)), 1, adapter)
            kept.append((t, adapter, pc.entries[max(pc.entries)]))
            assert [e for _, _, e in kept] == sorted(pc.entries.values(), key=lambda e: e.key)
        else:
            best, length = None, 0
            for u, a, e in kept:
                n = next((i for i, (x, y) in enumerate(zip(t[:-1], u)) if x != y), min(len(t) - 1, len(u)))
                if a == adapter and n > length and not (e.whole_only and n < len(u)):
                    best, length = e, n
            got = pc.match(t, adapter)
            assert (got[0], got[1]) == (best, length), (t, adapter)


@pytest.mark.parametrize("family", ["llama-untied", "gemma3"])
def test_cache_copies_go_a_slice_a_turn_beside_running_rows(family, tmp_path, tokenizer_dir, monkeypatch):
    """While a row decodes, a prompt's keys and values go into its rows, and a prefix cache hit's
    into its prompt cache, a slice of a layer a turn (a long prompt's are tens of MB: copied in one
    go, a gap that long in the running stream; a layer of 4,000 tokens, 16 MB for 8 heads x 64,
    still several ms); what every request generates is what it gives alone, and the rows being
    loaded are left alone by the steps between (Gemma 3's rings fill and wrap)."""
    import slm.model.kv_cache as kv_cache_mod
    import slm.serve.engine as engine_mod
    from slm.model import KVCache, RowKVCache
    fam, kw = FAMILIES[family]
    lm = slm.load(make_checkpoint(str(tmp_path / "m"), fam, tokenizer_dir, **kw))
    monkeypatch.setattr(engine_mod, "PREFILL_SHARE", 1e-9)  # every turn: one layer of a chunk or a copy slice
    cfg = lm.model.config
    slot = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # keys and values of a position in a layer, fp32
    monkeypatch.setattr(kv_cache_mod, "COPY_SLICE_BYTES", 16 * slot)  # 16 positions a slice
    engine = Engine(lm, max_batch=3, max_len=160, prefill_chunk=32)
    turns = []
    copy_turn = engine._copy_turn
    engine._copy_turn = lambda *a: turns.append(copy_turn(*a)) or turns[-1]
    g = torch.Generator().manual_seed(3)
    new = lambda n: torch.randint(5, 400, (n,), generator=g).tolist()  # noqa: E731
    stream, prompt = new(4), new(70)
    greedy = lambda ids, n: "".join(lm.stream(ids, max_new_tokens=n, temperature=0))  # noqa: E731
    from slm.runtime.generate import generate_ids
    reply = [step[0] for step in generate_ids(lm.model, [prompt], 8)]
    engine.start()
    try:
        # the second time the prompt, its reply and more: its start comes from the prefix cache
        for ids in (prompt, prompt + reply + new(6)):
            jobs = [(stream, Params(max_tokens=120, temperature=0), 1), (ids, Params(max_tokens=8, temperature=0), 1)]
            (a,), (b,) = asyncio.run(run(engine, jobs, 0.02))  # the stream decodes while the prompt goes in
            assert a == greedy(stream, 120) and b == greedy(ids, 8)
        assert engine.stats()["prefix_cache"]["hit_tokens"] >= len(prompt) + len(reply) - 1
        # the copies took a turn a slice: the first prompt's (70 tokens, more than ride) into its row,
        # then the second's start from the prefix cache into its row (6 tokens left: it rides the
        # steps), each of 70 positions or more (at least 5 slices a layer, 1 a layer of Gemma 3's
        # 8-slot rings)
        slices = sum(-(-min(70, engine.cache.size[w]) // 16) for w in engine.cache.windows)
        assert turns.count(False) >= 2 * (slices - 1), turns
    finally:
        engine.stop()
    # a step of a RowKVCache leaves an idle row (-1) as it is, on the module path too
    rows = RowKVCache(cfg, 2, 32, lm.model.device, lm.model.dtype)
    src = KVCache(cfg, 1, 32)
    with torch.no_grad():
        lm.model(torch.tensor([new(32)]), cache=src)
        rows.load_row(1, src)
        before = [k[1].clone() for k in rows.k]
        super(type(lm.model), lm.model).forward(torch.tensor([[7], [0]]), cache=rows, pos=torch.tensor([[0], [-1]]))
    assert all(torch.equal(k[1], b) for k, b in zip(rows.k, before))


@pytest.mark.parametrize("kept", [0, 1])  # none kept; one kept at a time, the older dropped
def test_prompt_caches_are_freed_off_the_engine_thread(kept, tmp_path, tokenizer_dir, monkeypatch):
    """Unmapping a long prompt's cache takes ~20 ms (180 MB for 4,000 SmolLM2 tokens): the engine
    hands the caches it lets go (not kept, or dropped from the prefix cache) to its allocator
    thread, so the last reference goes there. (The prompts go through batch-1 caches, not riding
    the steps: a riding prompt makes a cache only to keep its sequence in.)"""
    import threading
    import weakref

    import slm.serve.engine as engine_mod
    monkeypatch.setattr(engine_mod, "RIDE_TOKENS", 0)
    lm = slm.load(make_checkpoint(str(tmp_path / "m"), "llama", tokenizer_dir))
    engine = Engine(lm, max_batch=2, max_len=64)
    engine.prefixes.budget = kept * 16 * engine._token_bytes  # room for one sequence of 12 + 4 tokens
    freed_on = []
    new_cache = lm.model.new_cache

    def watched(*a, **kw):
        cache = new_cache(*a, **kw)
        weakref.finalize(cache, lambda: freed_on.append(threading.current_thread().name))
        return cache
    lm.model.new_cache = watched
    engine.start()
    try:
        for seed in range(3):
            prompt = torch.randint(5, 400, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
            asyncio.run(run(engine, [(prompt, Params(max_tokens=5, temperature=0), 1)]))
        deadline = time.time() + 5
        while len(freed_on) < 3 - kept and time.time() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert len(freed_on) == 3 - kept and all(name.startswith("slm-prefill-cache") for name in freed_on), freed_on
