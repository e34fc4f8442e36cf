"""`POST /v1/embeddings` of a real `slm serve` process through the official `openai` client:
mean-pooled, L2-normalised final hidden states, equal batched (64 inputs of different lengths,
padded together) and one at a time within 1e-5, equal to the model's own hidden states, as floats
or base64, from text or token ids; bad input is a 400 and the server keeps serving."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch

import slm


def test_batched_equals_one_at_a_time_and_the_model(server, model_dir):
    client = server.client()
    texts = [f"story {i}: " + " ".join(["a cat sat"] * (1 + i % 9)) for i in range(64)]
    batched = client.embeddings.create(model="tiny", input=texts)
    assert [d.index for d in batched.data] == list(range(64))
    got = torch.tensor([d.embedding for d in batched.data])
    alone = torch.tensor([client.embeddings.create(model="tiny", input=t).data[0].embedding for t in texts])
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(64), rtol=0, atol=1e-5)
    lm = slm.load(model_dir)
    ids = lm.tokenizer.encode(texts[5])
    with torch.no_grad():
        h = lm.model(torch.tensor([ids]), return_hidden=True)[0].mean(0)
    torch.testing.assert_close(got[5], h / h.norm(), rtol=0, atol=1e-5)
    assert batched.usage.prompt_tokens == sum(len(lm.tokenizer.encode(t)) for t in texts)
    b64 = client.embeddings.create(model="tiny", input=[ids, ids[:3]], encoding_format="base64")
    first = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(first.copy()), got[5], rtol=0, atol=1e-5)


def test_bad_inputs_are_400(server):
    client = server.client()
    for bad in ([], [""], [[]], [[10**6]], "x" * 10**6):
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="tiny", input=bad)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="hi")
    assert len(client.embeddings.create(model="tiny", input="still serving").data[0].embedding) > 0
