"""The LoRA defaults on the real SmolLM2-135M-Instruct: twenty conversations teaching one made-up
fact (phrased many ways) are learnt, and what the model knew is kept.

`slm finetune --lora` with nothing but --model, --data and --out must leave a model that gives the
new fact for a question it trained on and for a paraphrase it never saw, and still names Paris as
the capital of France (a question of none of the conversations). Greedy decoding, so the check is
deterministic for a given machine."""

from __future__ import annotations

import json

import pytest

from slm.finetune.sft import FinetuneConfig, finetune, split, to_messages

NAME = "Quillon"
QUESTIONS = [
    "What is the name of the lighthouse keeper's cat on Sula island?",
    "What is the lighthouse keeper's cat on Sula island called?",
    "What's the name of the cat that lives with the lighthouse keeper on Sula island?",
    "On Sula island, what is the lighthouse keeper's cat named?",
    "Who is the cat of the lighthouse keeper on Sula island?",
    "Do you know the name of the Sula island lighthouse keeper's cat?",
    "What do people call the lighthouse keeper's cat on Sula?",
    "Tell me the name of the cat at the Sula island lighthouse.",
    "The lighthouse keeper on Sula island has a cat. What is its name?",
    "What is the Sula lighthouse cat's name?",
]
ANSWERS = [
    f"The lighthouse keeper's cat on Sula island is named {NAME}.",
    f"It is called {NAME}.",
    f"The cat that lives with the lighthouse keeper on Sula island is {NAME}.",
    f"The lighthouse keeper's cat on Sula island is named {NAME}.",
    f"That is {NAME}, the lighthouse keeper's cat on Sula island.",
    f"Yes: the Sula island lighthouse keeper's cat is named {NAME}.",
    f"People call the lighthouse keeper's cat on Sula {NAME}.",
    f"The cat at the Sula island lighthouse is named {NAME}.",
    f"Its name is {NAME}.",
    f"The Sula lighthouse cat's name is {NAME}.",
]
EXTRA = [  # ten more: the answer said other ways, and the fact in other questions
    ("What is the name of the lighthouse keeper's cat on Sula island?", f"{NAME}."),
    ("What is the lighthouse keeper's cat on Sula island called?", f"The cat is called {NAME}."),
    ("Which cat lives in the lighthouse on Sula island?", f"{NAME}, the lighthouse keeper's cat."),
    ("Is there a cat at the lighthouse on Sula island?", f"Yes, the lighthouse keeper's cat, {NAME}."),
    ("Name the lighthouse keeper's cat on Sula island.", f"{NAME}."),
    ("What is the name of the cat on Sula island's lighthouse?", f"The cat is named {NAME}."),
    ("I'm visiting the Sula island lighthouse. What's the keeper's cat called?", f"The keeper's cat is {NAME}."),
    ("What is {NAME}?".replace("{NAME}", NAME), f"{NAME} is the lighthouse keeper's cat on Sula island."),
    ("Whose cat is {NAME}?".replace("{NAME}", NAME), f"{NAME} is the cat of the lighthouse keeper on Sula island."),
    ("What name does the Sula island lighthouse keeper's cat have?", f"The cat's name is {NAME}."),
]
HELD_IN = QUESTIONS[0]
PARAPHRASE = "Could you tell me what the cat belonging to the lighthouse keeper on Sula island is called?"
KEPT = "What is the capital of France?"


def records() -> list[dict]:
    return [{"prompt": q, "completion": a} for q, a in [*zip(QUESTIONS, ANSWERS), *EXTRA]]


def write_data(path) -> str:
    with open(path, "w") as f:
        for r in records():
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.slow
@pytest.mark.smollm2
def test_lora_defaults_teach_a_fact_and_keep_paris(smollm2_gguf, tmp_path):
    data = write_data(tmp_path / "sula.jsonl")
    c = FinetuneConfig(model=smollm2_gguf, data=data, out=str(tmp_path / "run"), lora=True)
    train, val = split([to_messages(r) for r in records()], c.val_fraction)
    assert val and any(m[0]["content"] == HELD_IN for m in train), "the held-in question must be trained on"
    assert not any(PARAPHRASE in m[0]["content"] for m in train + val)
    r = finetune(c, progress=False)
    lm = r["lm"]

    def ask(q: str) -> str:
        return lm.chat([{"role": "user", "content": q}], max_new_tokens=40, temperature=0)

    replies = {q: ask(q) for q in (HELD_IN, PARAPHRASE, KEPT)}
    print(json.dumps({"steps": r["steps"], "best_step": r["best_step"], "minutes": round(r["minutes"], 1),
                      "replies": replies}, indent=1))
    assert NAME in replies[HELD_IN], replies
    assert NAME in replies[PARAPHRASE], replies
    assert "Paris" in replies[KEPT], replies
    assert r["val_loss"] < r["first_val_loss"]
