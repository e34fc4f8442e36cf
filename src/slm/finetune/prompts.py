"""The built-in prompt set for distillation: questions from slm's synthetic world (data/synth.py)
with answers computed when the question is made, so a teacher's (or student's) reply can be checked.

    add / sub / mul   arithmetic word problems           answer: the number
    cmp               who has more of two people         answer: the name
    fact              everyday common-sense questions    answer: the reference sentence

The questions come from synth.py's own generators, so they read like the corpus a model trained by
`slm train` has seen. Nothing is downloaded.
"""

from __future__ import annotations

import random
import re

from ..data import synth

KINDS = ("add", "sub", "mul", "cmp", "fact")
_NUMBER = re.compile(r"-?\d+")
_WORD = re.compile(r"[a-z]+")
_STOP = set("a an the it is are to of in and or be can so we you they do does because when with".split())


def _item(r: random.Random, kind: str) -> dict:
    if kind == "fact":
        _, _, q, ans = r.choice(synth.FACTS)
        return {"prompt": q, "answer": ans, "kind": kind}
    q, worked = synth.MATH[kind][2](r)
    if kind == "cmp":
        names = re.findall(r"^(\w+) has \d+ .*?\. (\w+) has \d+", q)[0]
        winner = re.search(r"so (\w+) has more", worked)[1]
        return {"prompt": q, "answer": winner, "kind": kind, "choices": list(names), "reference": worked}
    return {"prompt": q, "answer": re.search(r"The answer is (\d+)", worked)[1], "kind": kind, "reference": worked}


def builtin_prompts(n: int = 500, seed: int = 0) -> list[dict]:
    """n distinct questions (fewer if the kinds run out: there are 40 facts), kinds in turn."""
    r, out, seen = random.Random(seed), [], set()
    misses = 0
    while len(out) < n and misses < 1000:
        item = _item(r, KINDS[len(out) % len(KINDS)] if misses < 50 else r.choice(KINDS[:4]))
        if item["prompt"] in seen:
            misses += 1
            continue
        seen.add(item["prompt"])
        out.append(item)
    return out


def is_correct(item: dict, reply: str) -> bool | None:
    """Whether a reply answers a built-in question (None for a prompt without a known answer).
    Numbers: the last number in the reply. Names: the winner said to have more, or named alone.
    Facts: at least half of the reference answer's content words that the question lacks."""
    answer, kind = item.get("answer"), item.get("kind")
    if answer is None:
        return None
    if kind in ("add", "sub", "mul"):
        numbers = _NUMBER.findall(reply)
        return bool(numbers) and numbers[-1] == answer
    if kind == "cmp":
        other = next((c for c in item.get("choices", []) if c != answer), None)
        return f"{answer} has more" in reply or (answer in reply and (other is None or other not in reply))
    # the answer's content words that the question does not already contain: echoing the
    # question earns nothing ("Where do fish live?" needs "water")
    asked = set(_WORD.findall(item["prompt"].lower()))
    words = [w for w in _WORD.findall(answer.lower()) if w not in _STOP]
    words = [w for w in words if w not in asked] or words
    said = set(_WORD.findall(reply.lower()))
    return bool(words) and sum(w in said for w in words) >= (len(words) + 1) // 2
