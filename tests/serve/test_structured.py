"""Structured outputs (serve/grammar.py, llguidance): with response_format or a GBNF grammar the
text always follows it, from a tiny random model (whose free text is noise) in a batch with free
rows, streamed or not, through the official `openai` client; a schema or grammar the engine cannot
use is a 400 naming the problem; the real instruction-tuned SmolLM2 writes JSON that fits."""

from __future__ import annotations

import asyncio
import enum
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import openai
import pytest
import torch
from pydantic import BaseModel, Field

import slm
from support.server import Server
from slm.serve.engine import Engine, Params, Request, deltas
from slm.serve.grammar import GrammarError, grammar_for


# Every value bounded: a random model cannot write forever inside a string.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "ok", "n", "tags"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b"]}}}}


def fits(text: str) -> bool:
    v = json.loads(text)
    return set(v) == {"colour", "ok", "n", "tags"} and v["colour"] in ("red", "green", "blue") and \
        isinstance(v["ok"], bool) and isinstance(v["n"], int) and 0 <= v["n"] <= 99 and \
        len(v["tags"]) <= 3 and set(v["tags"]) <= {"a", "b"}


def test_constrained_rows_fit_their_schema_beside_free_rows(model_dir):
    """Six requests through three rows: greedy and sampled rows under the schema, a GBNF row and
    free rows, batched together; the free rows give what they give alone."""
    lm = slm.load(model_dir)
    schema = grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    yes_no = grammar_for(grammar='root ::= "yes" | "no"')
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [5, 6, 7], [20, 21], [30]]
    params = [Params(max_tokens=60, temperature=0, grammar=schema), Params(max_tokens=40, temperature=0),
              Params(max_tokens=60, temperature=1.0, seed=3, grammar=schema), Params(max_tokens=20, grammar=yes_no),
              Params(max_tokens=30, temperature=0), Params(max_tokens=60, temperature=0.7, seed=4, grammar=schema)]
    engine = Engine(lm, max_batch=3, max_len=128)
    engine.start()

    async def go():
        reqs = [Request(p, s) for p, s in zip(prompts, params)]
        for r in reqs:
            engine.submit(r)
        out = []
        for r in reqs:
            text, finish = "", None
            async for d in deltas([r]):
                text, finish = text + d.text, d.finish_reason or finish
            out.append((text, finish))
        return out
    try:
        out = asyncio.run(go())
    finally:
        engine.stop()
    for (text, finish), p in zip(out, params):
        if p.grammar == schema:
            assert finish == "stop" and fits(text), text
    assert out[3] in (("yes", "stop"), ("no", "stop"))
    for i in (1, 4):
        assert out[i][0] == "".join(lm.stream(prompts[i], max_new_tokens=params[i].max_tokens, temperature=0))
    assert len({out[0][0], out[2][0], out[5][0]}) > 1  # sampling still chooses among what the schema allows


def test_formats_it_cannot_use_are_named():
    with pytest.raises(GrammarError, match="unknown type 'xml'"):
        grammar_for({"type": "xml"})
    with pytest.raises(GrammarError, match="give one of them"):
        grammar_for({"type": "json_object"}, grammar='root ::= "a"')
    with pytest.raises(GrammarError, match="under 'schema'"):
        grammar_for({"type": "json_schema", "json_schema": {"schema": [1]}})
    assert grammar_for({"type": "text"}) is None and grammar_for(None) is None


def test_the_api_enforces_formats_streamed_or_not(model_dir, tmp_path):
    server = Server(model_dir, str(tmp_path / "server.log"), "--max-batch", "4")
    try:
        client = server.client()
        fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
        kw = dict(model="tiny", messages=[{"role": "user", "content": "a thing"}], max_tokens=60, temperature=0)
        reply = client.chat.completions.create(response_format=fmt, **kw).choices[0]
        assert reply.finish_reason == "stop" and fits(reply.message.content)
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(response_format=fmt, stream=True, **kw) if c.choices)
        assert streamed == reply.message.content
        done = client.completions.create(model="tiny", prompt="Answer:", max_tokens=8,
                                         extra_body={"grammar": 'root ::= " yes" | " no"'}).choices[0]
        assert (done.text, done.finish_reason) in ((" yes", "stop"), (" no", "stop"))
        bad = [({"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "nonsense"}}}},
                "nonsense", "response_format"),
               ({"response_format": {"type": "yaml"}}, "unknown type", "response_format"),
               ({"extra_body": {"grammar": "root ::= missing"}}, "grammar", "grammar")]
        for extra, says, param in bad:
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(**kw, **extra)
            assert says in e.value.body["message"] and e.value.body["param"] == param
        assert client.chat.completions.create(**kw).choices[0].message.content  # still serving
    finally:
        server.stop()


@pytest.mark.smollm2
def test_smollm2_writes_json_that_fits(smollm2_gguf, tmp_path):
    """The real instruction-tuned model: JSON mode gives an object, a schema its fields."""
    server = Server(smollm2_gguf, str(tmp_path / "server.log"), "--max-batch", "2")
    try:
        client = server.client()
        name = client.models.list().data[0].id
        ask = [{"role": "user", "content": "Describe a person living in Paris as JSON."}]
        free = client.chat.completions.create(model=name, messages=ask, max_tokens=120, temperature=0)
        text = client.chat.completions.create(model=name, messages=ask, max_tokens=120, temperature=0,
                                              response_format={"type": "json_object"}).choices[0].message.content
        assert isinstance(json.loads(text), dict)
        person = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
                  "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                 "city": {"type": "string", "maxLength": 40}}}
        got = json.loads(client.chat.completions.create(
            model=name, messages=ask, max_tokens=120, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person}},
        ).choices[0].message.content)
        assert set(got) == {"name", "age", "city"} and isinstance(got["age"], int)
        print(f"free: {free.choices[0].message.content[:80]!r}; json_object: {text!r}; schema: {got}")
    finally:
        server.stop()


def test_constraints_mask_matches_the_grammar(model_dir):
    """The mask unpacked from llguidance's bitmask allows exactly the tokens that continue the text."""
    lm = slm.load(model_dir)
    from slm.serve.grammar import Constraints
    c = Constraints(lm.tokenizer, lm.model.config.vocab_size, lm.eos_ids)
    m = c.matcher(grammar_for(grammar='root ::= "ab" | "b"'))
    allowed = c.allowed([m])[0]
    ok = {t for t in range(lm.model.config.vocab_size) if allowed[t]}
    assert ok and all(("ab".startswith(s) or "b".startswith(s)) and s for s in
                      (lm.tokenizer.decode([t]) for t in ok))
    assert allowed.dtype == torch.bool and allowed.shape == (lm.model.config.vocab_size,)


# -- the openai client's parse(): Pydantic models as strict JSON schemas ---------------------------
class Colour(str, enum.Enum):
    red, green, blue = "red", "green", "blue"


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Shape(BaseModel):
    name: str = Field(max_length=24)
    colour: Colour
    corners: list[Point] = Field(max_length=4)
    filled: bool


def test_parse_returns_a_validated_object_from_random_weights(model_dir, tmp_path):
    """`client.chat.completions.parse(response_format=Shape)`: nested objects, an enum, bounded
    integers, an array: whatever a random model prefers, the reply validates."""
    server = Server(model_dir, str(tmp_path / "server.log"), "--max-batch", "4")
    try:
        client = server.client()
        for seed in range(3):
            done = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "a shape"}],
                                                 response_format=Shape, max_tokens=200, temperature=1.0, seed=seed)
            choice = done.choices[0]
            assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Shape), choice.message.content
    finally:
        server.stop()


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=120)
    city: str = Field(max_length=40)


class Address(BaseModel):
    street: str = Field(max_length=40)
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


class Contact(BaseModel):
    person: Person
    address: Address
    phones: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)


class Weather(BaseModel):
    city: str = Field(max_length=30)
    celsius: float = Field(ge=-60, le=60, multiple_of=0.1)
    sky: Literal["sunny", "cloudy", "rain", "snow"]


class Recipe(BaseModel):
    title: str = Field(max_length=40)
    minutes: int = Field(ge=1, le=600)
    ingredients: list[Annotated[str, Field(max_length=30)]] = Field(min_length=1, max_length=6)
    vegetarian: bool


class Review(BaseModel):
    product: str = Field(max_length=40)
    stars: int = Field(ge=1, le=5)
    sentiment: Literal["positive", "neutral", "negative"]


class Book(BaseModel):
    title: str = Field(max_length=50)
    author: str = Field(max_length=40)
    year: int = Field(ge=1400, le=2030)
    genres: list[Literal["fiction", "history", "science", "poetry", "children"]] = Field(max_length=3)


class Event(BaseModel):
    name: str = Field(max_length=40)
    day: int = Field(ge=1, le=31)
    month: int = Field(ge=1, le=12)
    guests: list[Person] = Field(max_length=2)


class Answer(BaseModel):
    question: str = Field(max_length=60)
    answer: Literal["yes", "no", "maybe"]
    confidence: float = Field(ge=0, le=1, multiple_of=0.01)


class Inventory(BaseModel):
    shop: str = Field(max_length=30)
    items: list[Weather | Review] = Field(max_length=2)
    open: bool


SCHEMAS = [(Person, "a person who lives in Rome"), (Contact, "a contact card for a plumber"),
           (Weather, "the weather in Oslo today"), (Recipe, "a recipe for pancakes"),
           (Review, "a review of a new phone"), (Book, "a famous novel"), (Event, "a birthday party"),
           (Answer, "whether the sea is salty"), (Inventory, "a small shop"), (Shape, "a red triangle")]


MAX_TOKENS = 400


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_200_replies_over_10_schemas_all_validate(smollm2_gguf, tmp_path):
    """200 requests, 16 at a time, over 10 schemas (nested objects, arrays, enums, bounded numbers,
    required fields, a union): every reply of the real instruction-tuned model parses and validates.
    Strings carry a maxLength and fractions a multipleOf, as a schema for a small model should: the
    grammar allows any length otherwise, and SmolLM2 sometimes runs on inside a string or after a
    decimal point ("0.70000000000000001744...") until max_tokens cuts it off, unfinished."""
    server = Server(smollm2_gguf, str(tmp_path / "server.log"), "--max-batch", "16")
    try:
        client = server.client()
        name = client.models.list().data[0].id

        def one(i):
            model, what = SCHEMAS[i % len(SCHEMAS)]
            try:
                done = client.chat.completions.parse(
                    model=name, response_format=model, max_tokens=MAX_TOKENS, temperature=0.7, seed=i,
                    messages=[{"role": "user", "content": f"Give me {what} as JSON."}])
            except openai.LengthFinishReasonError as e:  # cut off before the grammar was complete
                return model.__name__, e.completion.choices[0].message.content
            parsed = done.choices[0].message.parsed
            return model.__name__, None if isinstance(parsed, model) else done.choices[0].message.content
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(one, range(200)))
        bad = [(name, text) for name, text in replies if text is not None]
        assert not bad, f"{len(bad)} of 200 did not validate: {bad[:3]}"
    finally:
        server.stop()
