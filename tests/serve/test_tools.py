"""Tool calls through the official `openai` client against a real `slm serve`: with tool_choice
"required" or a named function the reply is a call whose arguments fit the function's schema (a
random tiny model too: the grammar holds whatever it prefers), streamed or not; the round trip (the
call, a `tool` message with its result, the final answer) is accepted; bad tools are 400s; the
real SmolLM2 calls the weather tool for Paris and answers from its result."""

from __future__ import annotations

import json

import openai
import pytest

from support.models import make_checkpoint
from support.server import Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}}}


def fits(call) -> bool:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return set(args) == {"city", "unit"} and len(args["city"]) <= 30 and args["unit"] in ("celsius", "fahrenheit")
    return call.function.name == "get_time" and args == {"zone": args["zone"]} and args["zone"] in ("UTC", "CET", "PST")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_dir):
    model = make_checkpoint(str(tmp_path_factory.mktemp("tools") / "tiny"), "llama", tokenizer_dir,
                            max_position_embeddings=2048)  # room for the tools system prompt
    s = Server(model, str(tmp_path_factory.mktemp("log") / "server.log"), "--max-batch", "4")
    yield s
    s.stop()


def round_trip(client, name, ask, tool_choice, max_tokens):
    """(the call the reply made, the final answer after the tool's result), streamed and not alike."""
    messages = [{"role": "user", "content": ask}]
    kw = dict(model=name, tools=[WEATHER, TIME], max_tokens=max_tokens, temperature=0)
    reply = client.chat.completions.create(messages=messages, tool_choice=tool_choice, **kw).choices[0]
    assert reply.finish_reason == "tool_calls" and len(reply.message.tool_calls) == 1
    call = reply.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and fits(call)
    calls = {}
    for chunk in client.chat.completions.create(messages=messages, tool_choice=tool_choice, stream=True, **kw):
        for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            calls.setdefault(c.index, {"name": "", "arguments": ""})
            calls[c.index]["name"] += c.function.name or ""
            calls[c.index]["arguments"] += c.function.arguments or ""
    assert calls == {0: {"name": call.function.name, "arguments": call.function.arguments}}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21, "sky": "sunny"}'}]
    final = client.chat.completions.create(messages=messages, tool_choice="none", **kw).choices[0]
    assert final.finish_reason in ("stop", "length") and not final.message.tool_calls
    return call, final.message.content


def test_required_and_named_calls_fit_their_schemas(server):
    client = server.client()
    call, answer = round_trip(client, "tiny", "weather in Paris?", "required", 150)
    assert answer
    named = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "time?"}],
                                           tools=[WEATHER, TIME], max_tokens=150, temperature=0.9, seed=2,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and fits(call)


def test_bad_tools_are_400(server):
    client = server.client()
    ask = [{"role": "user", "content": "hi"}]
    for kw in (dict(tools=[{"type": "function", "function": {"description": "no name"}}]),
               dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
               dict(tools=[WEATHER], tool_choice="sometimes"),
               dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=ask, max_tokens=5, **kw)
    free = client.chat.completions.create(model="tiny", messages=ask, max_tokens=5, tools=[WEATHER])
    assert free.choices[0].finish_reason in ("stop", "length")  # auto: random text, no call


@pytest.mark.smollm2
def test_smollm2_calls_the_weather_tool_and_answers(smollm2_gguf, tmp_path):
    server = Server(smollm2_gguf, str(tmp_path / "server.log"), "--max-batch", "2")
    try:
        client = server.client()
        name = client.models.list().data[0].id
        call, answer = round_trip(client, name, "What is the weather like in Paris right now?", "required", 120)
        assert call.function.name == "get_weather" and "paris" in json.loads(call.function.arguments)["city"].lower()
        print(f"call: {call.function.arguments}; answer: {answer!r}")
        assert answer and ("21" in answer or "sunny" in answer.lower())
    finally:
        server.stop()
