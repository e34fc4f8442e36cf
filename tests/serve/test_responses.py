"""OpenAI's /v1/responses through the official `openai` client against a real `slm serve`: text in
(a string, or messages with instructions) and out, streamed as its typed events or not, the same
text as chat completions gives the same conversation; max_output_tokens ends it incomplete."""

from __future__ import annotations

import openai
import pytest



def test_responses_equal_chat_streamed_or_not(server):
    client = server.client()
    r = client.responses.create(model="tiny", input="Tell me a story", instructions="Be brief.",
                                max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}])
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 12 and r.usage.input_tokens == chat.usage.prompt_tokens
    kinds, deltas, final = [], [], None
    for ev in client.responses.create(model="tiny", input=[{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "Tell me a story"}],
                                      max_output_tokens=12, temperature=0, stream=True):
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
        if ev.type in ("response.completed", "response.incomplete"):
            final = ev.response
    assert "".join(deltas) == r.output_text == final.output_text
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input=[{"role": "robot", "content": "x"}])
