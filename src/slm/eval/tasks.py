"""Multiple-choice tasks read from local files in each dataset's own field layout, turned into
the items lm-evaluation-harness builds from them (its task configs: doc_to_text, doc_to_choice,
doc_to_target; target delimiter " ").

    hellaswag   activity_label, ctx_a, ctx_b, endings, label   "{label}: {ctx_a} {Ctx_b}" (WikiHow
                                                              artefacts like " [title]" cleaned)
    piqa        goal, sol1, sol2, label                       "Question: {goal}\\nAnswer:"
    arc         question, choices{text,label}, answerKey      "Question: {question}\\nAnswer:"
    winogrande  sentence, option1, option2, answer            partial scoring: each context is the
                                                              sentence up to "_" with an option in
                                                              it, the continuation the rest

and `builtin`, the common-sense probes of `slm.data.probes`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..data.probes import probes
from ..files import parse_json

FORMATS = ("hellaswag", "piqa", "arc", "winogrande")


@dataclass
class Doc:
    """One multiple-choice item as lm-eval's ConfigurableTask sees it."""
    query: str | None  # doc_to_text; None for WinoGrande, whose contexts are the choices themselves
    choices: list[str]  # doc_to_choice; acc_norm divides by their lengths in characters
    gold: int
    target: str | None = None  # WinoGrande: the continuation shared by every choice
    kind: str | None = None  # builtin probes: what the probe tests

    def requests(self, fewshot: str = "") -> list[tuple[str, str]]:
        """(context, continuation) per choice, after the few-shot examples."""
        if self.target is None:
            return [(fewshot + self.query, " " + c) for c in self.choices]
        return [(fewshot + c, " " + self.target) for c in self.choices]

    def example(self) -> str:
        """This item answered, as a few-shot example."""
        if self.target is None:
            return self.query + " " + self.choices[self.gold]
        return self.choices[self.gold] + " " + self.target


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: brackets are artefacts of the WikiHow half of the data."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(d: dict) -> Doc:
    ctx = _str(d, "ctx_a") + " " + _str(d, "ctx_b").capitalize()
    endings = _strings(d, "endings")
    return Doc(hellaswag_preprocess(_str(d, "activity_label") + ": " + ctx),
               [hellaswag_preprocess(e) for e in endings], _index(d, "label", len(endings)))


def _piqa(d: dict) -> Doc:
    return Doc(f"Question: {_str(d, 'goal')}\nAnswer:", [_str(d, "sol1"), _str(d, "sol2")], _index(d, "label", 2))


def _arc(d: dict) -> Doc:
    choices = d.get("choices")
    if not isinstance(choices, dict):
        raise ValueError("field 'choices' must be an object with lists 'text' and 'label'")
    texts, labels = _strings(choices, "text"), _strings(choices, "label")
    if len(texts) != len(labels):
        raise ValueError(f"choices has {len(texts)} texts but {len(labels)} labels")
    key = _str(d, "answerKey")
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    return Doc(f"Question: {_str(d, 'question')}\nAnswer:", texts, labels.index(key))


def _winogrande(d: dict) -> Doc:
    sentence = _str(d, "sentence")
    if "_" not in sentence:
        raise ValueError("the sentence has no '_' blank to fill")
    i = sentence.index("_")
    answer = _str(d, "answer")
    if answer not in ("1", "2"):
        raise ValueError(f"answer must be '1' or '2', got {answer!r}")
    options = [_str(d, "option1"), _str(d, "option2")]
    return Doc(None, [sentence[:i] + o for o in options], int(answer) - 1, target=sentence[i + 1:].strip())


READERS = {"hellaswag": _hellaswag, "piqa": _piqa, "arc": _arc, "winogrande": _winogrande}


def check_format(fmt: str | None) -> str:
    if fmt not in READERS:
        raise ValueError(f"unknown task format {fmt!r}: choose one of {', '.join(FORMATS)} "
                         "(or --task builtin)")
    return fmt


def load_task(path: str, fmt: str | None = None) -> list[Doc]:
    """Items of a task: `builtin`, or a .jsonl file (one JSON object per line; a .json file
    holding a list also works) in the field layout of fmt."""
    if path == "builtin":
        return [Doc(p["context"], p["choices"], p["gold"], kind=p["kind"]) for p in probes()]
    fmt = check_format(fmt)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such task file")
    with open(path, "rb") as f:
        if path.endswith(".json"):
            whole = parse_json(f.read(), path)
            if not isinstance(whole, list):
                raise ValueError(f"{path}: a .json task file holds a list of items, got {type(whole).__name__}")
            records = [(i + 1, r) for i, r in enumerate(whole)]
        else:
            records = [(n, parse_json(line, f"{path}:{n}")) for n, line in enumerate(f, 1) if line.strip()]
    docs = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: item {where} is not a JSON object")
        try:
            docs.append(READERS[fmt](rec))
        except ValueError as e:
            raise ValueError(f"{path}: item {where} is not a {fmt} item: {e}") from None
    if not docs:
        raise ValueError(f"{path}: no items")
    return docs


def _field(d: dict, key: str):
    if key not in d:
        raise ValueError(f"missing field {key!r} (has {', '.join(map(repr, d)) or 'no fields'})")
    return d[key]


def _str(d: dict, key: str) -> str:
    v = _field(d, key)
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)  # labels and answers come as strings or numbers depending on the export
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def _strings(d: dict, key: str) -> list[str]:
    v = _field(d, key)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError(f"field {key!r} must be a non-empty list of strings")
    return v


def _index(d: dict, key: str, n: int) -> int:
    v = _str(d, key).strip()
    if not v.isdigit() or int(v) >= n:
        raise ValueError(f"field {key!r} must be a choice index in [0, {n}), got {d[key]!r}")
    return int(v)
