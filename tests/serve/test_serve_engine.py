"""The continuous-batching engine on its own: requests joining and leaving a running batch give
exactly what each gives alone (also through sliding-window caches), seeded sampling does not depend
on the batch, penalties follow OpenAI's definition, and a cancelled request stops computing."""

import asyncio

import pytest
import torch

import slm
from support.models import FAMILIES, make_checkpoint
from slm.runtime.generate import stream_text
from slm.serve.engine import Engine, Params, Request, deltas


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


def serve(lm, jobs, max_batch=3, stagger=0.0):
    engine = Engine(lm, max_batch=max_batch, max_len=128)
    engine.start()
    try:
        return asyncio.run(run(engine, jobs, stagger)), engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tokenizer_dir):
    return slm.load(make_checkpoint(str(tmp_path_factory.mktemp("engine")), "llama", tokenizer_dir))


@pytest.mark.parametrize("family,quantize", [("llama-untied", None), ("mistral-gqa", None), ("gemma3", None),
                                             ("gemma3", "int4"), ("phi", "int8")])
def test_batched_greedy_equals_alone(family, quantize, tmp_path, tokenizer_dir):
    """6 requests through 3 rows: later ones join a running batch as rows free up; prompts and
    generations longer than the sliding windows (16 for Mistral, 8 for Gemma) roll the cache.
    Quantized models too (embedding included: the engine takes the model's dtype, not the table's)."""
    fam, kw = FAMILIES[family]
    lm = slm.load(make_checkpoint(str(tmp_path / "m"), fam, tokenizer_dir, **kw), quantize=quantize)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (4, 30, 11, 2, 19, 7)]
    lengths = [25, 9, 40, 17, 30, 12]
    jobs = [(p, Params(max_tokens=m, temperature=0), 1) for p, m in zip(prompts, lengths)]
    out, engine = serve(lm, jobs, max_batch=3, stagger=0.01)
    for (p, m), (text,) in zip(zip(prompts, lengths), out):
        assert text == "".join(lm.stream(p, max_new_tokens=m, temperature=0))
    assert engine.generated == sum(lengths)  # random weights: no EOS within these lengths


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
