"""`echo` with `logprobs` on /v1/completions (what lm-evaluation-harness's `local-completions`
backend asks for log-likelihoods): the prompt's own tokens come back with their logprobs given the
tokens before them, equal to the model's, with `max_tokens` 0 (nothing generated) or followed by
a generation; streamed or not; through the official `openai` client against a real server."""

from __future__ import annotations

import pytest
import torch

import slm


def test_echo_gives_the_prompts_logprobs(server, model_dir):
    lm = slm.load(model_dir)
    client = server.client()
    text = "The cat sat on the mat and looked at the dog."
    ids = lm.tokenizer.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids]))[0].float(), -1)
    want = [None] + [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    for prompt in (text, ids):
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                         temperature=0).choices[0]
        lp = got.logprobs
        # the prompt as it was sent: a string as it is, token ids decoded
        assert got.finish_reason == "length" and got.text == (
            prompt if isinstance(prompt, str) else lm.tokenizer.decode(ids, skip_special_tokens=False))
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), torch.tensor(want[1:]), rtol=0, atol=1e-4)
        for i in range(1, len(ids)):  # the top 2, the first of them the greedy choice
            top = lp.top_logprobs[i]
            # (two tokens whose text is the same, as byte pieces, share one key of the dict)
            assert 1 <= len(top) <= 2 and abs(max(top.values()) - logp[i - 1].max().item()) < 1e-4
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # echo and a generation after it: the prompt's logprobs, then the generated tokens'
    full = client.completions.create(model="tiny", prompt=ids, max_tokens=4, echo=True, logprobs=0,
                                     temperature=0).choices[0]
    alone = client.completions.create(model="tiny", prompt=ids, max_tokens=4, logprobs=0, temperature=0).choices[0]
    head = lm.tokenizer.decode(ids, skip_special_tokens=False)
    assert full.text == head + alone.text
    assert full.logprobs.tokens[len(ids):] == alone.logprobs.tokens
    assert full.logprobs.text_offset[len(ids):] == [o + len(head) for o in alone.logprobs.text_offset]
    torch.testing.assert_close(torch.tensor(full.logprobs.token_logprobs[1:len(ids)]), torch.tensor(want[1:]),
                               rtol=0, atol=1e-4)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=ids, max_tokens=4, echo=True, temperature=0, stream=True) if c.choices)
    assert streamed == full.text
    usage = client.completions.create(model="tiny", prompt=[ids, ids[:5]], max_tokens=0, echo=True).usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids) + 5, 0)


def test_max_tokens_0_needs_echo(server):
    import openai
    with pytest.raises(openai.BadRequestError, match="0 only with echo"):
        server.client().completions.create(model="tiny", prompt="hi", max_tokens=0)
