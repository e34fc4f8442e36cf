"""slm eval against transformers: per-item log-likelihoods of the four task formats and rolling
perplexity, each recomputed here by a plain loop over a transformers model of the same
checkpoint, with the prompts rebuilt from the raw fields as lm-evaluation-harness's task configs
build them."""

import json
import math
import os
import random
import re

import pytest
import torch

import slm
from slm.cli import main
from slm.eval import evaluate, load_task, perplexity, rolling_windows
from slm.eval.perplexity import disjoint

from support.models import CORPUS, hf_model, make_checkpoint

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "data", "eval")
FORMATS = ["hellaswag", "piqa", "arc", "winogrande"]
TEXT = " ".join(CORPUS[:5]) + "\nThe end of the story came at night, when the stars were out over the quiet farm."


def task_file(fmt: str) -> str:
    return os.path.join(DATA, f"{fmt}.jsonl")


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model_dir(request, tmp_path_factory, tokenizer_dir) -> str:
    # gemma3's tiny config slides an 8-token window over these prompts; 1024 positions fit 2-shot prompts
    kw = {"num_key_value_heads": 2} if request.param == "gemma3" else {}
    return make_checkpoint(str(tmp_path_factory.mktemp(request.param)), request.param, tokenizer_dir,
                           max_position_embeddings=1024, **kw)


@pytest.fixture(scope="module")
def ours(model_dir):
    return slm.load(model_dir)


@pytest.fixture(scope="module")
def theirs(model_dir):
    from transformers import AutoTokenizer
    return hf_model(model_dir), AutoTokenizer.from_pretrained(model_dir)


# -- the reference: lm-eval's prompts from the raw fields, scored by transformers --------------------------
def hs_clean(text):
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def reference_prompts(fmt: str, doc: dict):
    """(text, choices, gold, shared continuation or None) as lm-eval's yaml configs define them."""
    if fmt == "hellaswag":
        query = hs_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        return query, [hs_clean(e) for e in doc["endings"]], int(doc["label"]), None
    if fmt == "piqa":
        return f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"], None
    if fmt == "arc":
        c = doc["choices"]
        return f"Question: {doc['question']}\nAnswer:", c["text"], c["label"].index(doc["answerKey"]), None
    cut = doc["sentence"].index("_")
    choices = [doc["sentence"][:cut] + doc["option1"], doc["sentence"][:cut] + doc["option2"]]
    return None, choices, int(doc["answer"]) - 1, doc["sentence"][cut + 1:].strip()


def reference_requests(fmt: str, docs: list[dict], shots: int):
    rng, out = random.Random(1234), []
    for i, doc in enumerate(docs):
        prefix = ""
        if shots:
            for j in [j for j in rng.sample(range(len(docs)), shots + 1) if j != i][:shots]:
                text, choices, gold, cont = reference_prompts(fmt, docs[j])
                prefix += (text + " " + choices[gold] if cont is None else choices[gold] + " " + cont) + "\n\n"
        text, choices, gold, cont = reference_prompts(fmt, doc)
        reqs = [(prefix + text, " " + c) for c in choices] if cont is None else [(prefix + c, " " + cont) for c in choices]
        out.append((reqs, choices, gold))
    return out


@torch.no_grad()
def reference_loglik(model, tok, context: str, continuation: str):
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation)["input_ids"]  # with the tokenizer's BOS, as slm's default
    ctx = tok(context)["input_ids"]
    cont = whole[len(ctx):]
    logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    rows = logp[len(ctx) - 1:len(whole) - 1]
    ll = sum(rows[k, t].item() for k, t in enumerate(cont))
    return ll, rows.argmax(-1).tolist() == cont


def read_docs(fmt):
    with open(task_file(fmt)) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("fmt, shots", [(f, 0) for f in FORMATS] +
                         [pytest.param(f, 2, marks=pytest.mark.slow) for f in FORMATS])
def test_loglikelihoods_and_accuracy_match_transformers(ours, theirs, fmt, shots):
    model, tok = theirs
    result = evaluate(ours, task_file(fmt), fmt, num_fewshot=shots, batch_size=5, progress=False)
    ref = reference_requests(fmt, read_docs(fmt), shots)
    assert result["n"] == len(ref) == 6
    accs, norms = [], []
    for item, (reqs, choices, gold) in zip(result["items"], ref):
        lls, greedy = zip(*(reference_loglik(model, tok, c, x) for c, x in reqs))
        assert item["gold"] == gold
        assert item["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        assert item["is_greedy"] == list(greedy)
        pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
        pred_norm = max(range(len(lls)), key=lambda i: (lls[i] / len(choices[i]), -i))
        accs.append(float(pred == gold))
        norms.append(float(pred_norm == gold))
        assert (item["acc"], item["acc_norm"]) == (accs[-1], norms[-1])
    assert result["metrics"]["acc"] == sum(accs) / len(accs)
    assert result["metrics"]["acc_norm"] == sum(norms) / len(norms)
    se = math.sqrt(sum((x - sum(accs) / 6) ** 2 for x in accs) / 5) / math.sqrt(6)
    assert result["metrics"]["acc_stderr"] == pytest.approx(se)


def test_hellaswag_preprocess_as_lm_eval():
    doc = load_task(task_file("hellaswag"), "hellaswag")[1]
    assert doc.query == ("Home and Garden: How to water a small garden. Check the soil first. Push a finger into "
                         "the soil near the plants. If it feels dry")
    assert doc.choices[0] == " it is time to give the plants some water."  # lm-eval keeps the space
    assert doc.choices[2] == " Bury the watering can. Cover it with sand."  # "[title]" at the start: no period
    wino = load_task(task_file("winogrande"), "winogrande")[0]
    assert wino.requests() == [("The cup did not fit in the box because the cup", " was too big."),
                               ("The cup did not fit in the box because the box", " was too big.")]


def test_batch_size_and_order_do_not_change_scores(ours):
    one = evaluate(ours, task_file("arc"), "arc", num_fewshot=1, batch_size=1, progress=False)
    many = evaluate(ours, task_file("arc"), "arc", num_fewshot=1, batch_size=7, progress=False)
    for a, b in zip(one["items"], many["items"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)


# -- perplexity ---------------------------------------------------------------------------------------
def test_rolling_windows_are_lm_eval_windows():
    # lm-eval's tests/test_utils.py gold for get_rolling_token_windows(range(34), -100, 10, 1)
    gold = [([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], list(range(10))),
            (list(range(9, 19)), list(range(10, 20))),
            (list(range(19, 29)), list(range(20, 30))),
            (list(range(23, 33)), [30, 31, 32, 33])]
    assert list(rolling_windows(list(range(34)), -100, 10, 1)) == gold
    assert disjoint(gold[3]) == (list(range(23, 30)), [30, 31, 32, 33])
    assert disjoint(gold[1]) == ([9], list(range(10, 20)))


@torch.no_grad()
def reference_perplexity(model, tok, text: str, L: int) -> tuple[float, int]:
    """Every token predicted once, from the L tokens before it at most: window after window of
    L inputs, the first starting at BOS, the last re-reading earlier tokens."""
    seq = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    n, ll, p = len(seq) - 1, 0.0, 0
    while p < n:
        e = min(p + L, n)
        a = max(e - L, 0)
        logp = model(torch.tensor([seq[a:e]])).logits[0].float().log_softmax(-1)
        ll += sum(logp[j - a, seq[j + 1]].item() for j in range(p, e))
        p = e
    return ll, n


def test_perplexity_matches_transformers(ours, theirs):
    lm, (model, tok) = ours, theirs
    r = perplexity(lm, TEXT, max_length=24, batch_size=3, progress=False)
    ll, n = reference_perplexity(model, tok, TEXT, 24)
    assert r["tokens"] == n and r["windows"] == math.ceil(n / 24) >= 4
    assert r["loglikelihood"] == pytest.approx(ll, abs=1e-3)
    assert r["token_perplexity"] == pytest.approx(math.exp(-ll / n), rel=1e-5)
    words, n_bytes = len(re.split(r"\s+", TEXT)), len(TEXT.encode())
    assert r["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert r["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)


# -- the built-in probes ---------------------------------------------------------------------------------
def test_builtin_probes_are_new_text_and_well_formed(tmp_path):
    from slm.data.probes import KINDS, probes
    from slm.data.synth import write_corpus
    ps = probes()
    assert ps == probes() and len(ps) == 20 * len(KINDS)
    assert {p["kind"] for p in ps[:len(KINDS)]} == set(KINDS)  # kinds take turns: --limit stays balanced
    for p in ps:
        assert 0 <= p["gold"] < len(p["choices"]) and len(set(p["choices"])) == len(p["choices"])
    write_corpus(str(tmp_path), 3000, seed=0)
    train = (tmp_path / "train.txt").read_text()
    for p in ps:
        assert p["context"] + " " + p["choices"][p["gold"]] not in train
        assert p["context"] not in train


def test_held_out_probes_are_other_probes_of_every_kind():
    from slm.data.probes import KINDS, held_out, probes
    reported = {p["context"] for p in probes()}
    held = held_out()
    assert held == held_out() and len(held) > 400
    assert not reported & {p["context"] for p in held}
    assert {p["kind"] for p in held} == set(KINDS)


# Each probe's sentence frame, its names, numbers and things left open: the lessons teach the same
# facts in other sentences ("Now she has" after other starts than "has 5 pears and eats two"), so a
# model that answers a probe has carried the fact over, not completed a sentence it was shown.
PROBE_FRAMES = {
    "arithmetic": [r"has \d+ \w+ and eats \w+\. Now (he|she) has", r"and then (his|her) \w+ gave (him|her) \w+ more\. Now"],
    "compare": [r"The one with more \w+ is"],
    "animal_sound": [r"heard an? \w+ say\b", r"heard\. It was the sound of the"],
    "baby_animal": [r"with their babies\. The babies were"],
    "opposite": [r"The opposite of \w+ is", r"(^|[.!?:]\s+)[A-Z][a-z]* is the opposite of"],
    "color": [r"The color of [^.]* is", r"What color is [^?]*\? It is"],
    "feeling": [r"\. (He|She) felt very"],
    "pronoun": [r"who likes to play at the \w+\. Every day, \w+ brings"],
    "food": [r"was very hungry after playing at the \w+, so (he|she) ate"],
}


def test_no_lesson_uses_a_probes_sentence_frame(tmp_path):
    import random
    import re

    from slm.data.lessons import LESSONS, lesson
    from slm.data.probes import KINDS, probes
    from slm.data.synth import write_corpus
    frames = {kind: [re.compile(f, re.M) for f in fs] for kind, fs in PROBE_FRAMES.items()}
    for p in probes():  # each frame is the frame of its kind's probes
        if p["kind"] in frames:
            assert any(f.search(p["context"]) for f in frames[p["kind"]]), p["context"]
    assert set(frames) | {"nature"} == set(KINDS)  # nature's probes are whole scenes, checked as text above
    r = random.Random(0)
    docs = [lesson(r, kind)[1] for kind in LESSONS for _ in range(3000)]
    write_corpus(str(tmp_path), 3000, seed=1)
    docs.append((tmp_path / "train.txt").read_text())
    for kind, fs in frames.items():
        for f in fs:
            hit = next((m for d in docs for m in [f.search(d)] if m), None)
            assert hit is None, f"{kind}: the corpus uses a probe's frame: {hit.string[max(hit.start() - 60, 0):hit.end() + 20]!r}"


def test_builtin_task_runs_and_states_chance(ours):
    r = evaluate(ours, "builtin", limit=30, batch_size=16, progress=False)
    assert r["n"] == 30 and r["format"] == "builtin"
    assert 0.25 < r["metrics"]["chance"] < 0.5
    assert set(r["by_kind"]) == {it["kind"] for it in r["items"]}


def test_probe_scores_during_training_are_slm_evals(ours):
    """data.probes.score (what `slm train` logs with each validation loss) gives the accuracy that
    `slm eval --task builtin` gives, item for item."""
    from slm.data.probes import probes, score, summary
    r = evaluate(ours, "builtin", limit=40, batch_size=16, progress=False)
    s = score(ours, probes()[:40], batch_size=7)
    assert s["acc"] == r["metrics"]["acc"] and s["chance"] == r["metrics"]["chance"]
    assert s["by_kind"] == {k: m["acc"] for k, m in r["by_kind"].items()}
    assert summary(s).startswith(f"built-in probes: acc {s['acc']:.3f} (chance {s['chance']:.3f}); ")


# -- the judge ---------------------------------------------------------------------------------------------
def test_judge_grades_arithmetic_pronouns_and_repetition():
    from slm.eval import judge
    lesson = "Exercise: Tom has 3 cups.\nAnswer: 3 + 4 = 7. And 10 - 3 = 6, and 2 x 5 = 10."
    assert judge.arithmetic([lesson]) == (2, 3)
    story = ("Lily went to the park, and she saw her friend. Tom lost his kite, and she helped him. "
             "Ben said she was late. Lily and Tom ran home. Mom told Lily she was kind.")
    # checked: Lily/She (agree), Tom-she-him (both genders: skipped), Ben/she (disagree); Mom: skipped
    assert judge.pronouns([story]) == (1, 2)
    assert judge.names([story, "Mia and Mia."]) == (3 + 1) / 2  # Lily, Tom, Ben; Mia
    assert judge.repetition(["a b c d a b c d"]) == 1 / 5
    assert judge.repetition(["a b c d e f"]) == 0.0


def test_judge_perplexity_is_the_models_own(ours):
    from slm.eval import judge
    text = "Once upon a time there was a cat."
    ids = ours.tokenizer.encode(text, add_special_tokens=False)
    start = judge.prefix_token(ours)
    with torch.no_grad():
        logp = torch.log_softmax(ours.model(torch.tensor([[start] + ids[:-1]]))[0].double(), -1)
    nll = -logp[torch.arange(len(ids)), torch.tensor(ids)].mean().item()
    assert abs(judge.perplexity(ours, [text]) - math.exp(nll)) < 1e-3 * math.exp(nll)
    g = judge.judge([text], reference=ours)
    assert g["samples"] == 1 and g["perplexity"] == judge.perplexity(ours, [text])


def test_demo_judges_the_samples_it_prints(ours):
    from slm.demo import LESSON_SAMPLES, STORY_SAMPLES, judge_samples
    g = judge_samples(ours)
    assert g["samples"] == {"lessons": LESSON_SAMPLES, "stories": STORY_SAMPLES}
    right, checked = g["arithmetic"]
    agree, named = g["pronouns"]
    assert 0 <= right <= checked and 0 <= agree <= named and 0 <= g["repetition"] <= 1
    assert 1.5 <= g["corpus_names"] <= 3 and g["names"] >= 0


# -- the command line ------------------------------------------------------------------------------------
def test_cli_task_writes_json(model_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    main(["eval", "--model", model_dir, "--task", task_file("piqa"), "--task-format", "piqa", "--num-fewshot", "1",
          "--limit", "4", "--batch-size", "3", "--output", str(out)])
    table = capsys.readouterr().out
    assert "| piqa" in table and "acc_norm" in table and "chance level 0.5000" in table
    r = json.loads(out.read_text())
    assert r["n"] == 4 and r["num_fewshot"] == 1
    assert all(len(it["loglikelihoods"]) == len(it["is_greedy"]) == 2 for it in r["items"])
    api = evaluate(slm.load(model_dir), task_file("piqa"), "piqa", num_fewshot=1, limit=4, progress=False)
    for a, b in zip(r["items"], api["items"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)


def test_cli_text(model_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    main(["eval", "--model", model_dir, "--text", str(f), "--max-length", "32", "--output", str(tmp_path / "p.json"),
          "--receipt", str(tmp_path / "receipt.json")])
    out = capsys.readouterr().out
    assert "word_perplexity" in out and "bits_per_byte" in out
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["max_length"] == 32
    # the energy receipt counts every token the model read (the windows overlap by nothing: one pass)
    receipt = json.loads((tmp_path / "receipt.json").read_text())
    assert receipt["verb"] == "eval" and receipt["tokens"]["inferred"] >= r["tokens"]


# -- bad input -------------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt, row, message", [
    ("hellaswag", {"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "label": "0"}, "missing field 'endings'"),
    ("hellaswag", {"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["e"], "label": ""}, "field 'label'"),
    ("piqa", {"goal": "g", "sol1": "a", "label": 0}, "missing field 'sol2'"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "choice index in [0, 2)"),
    ("arc", {"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}, "answerKey 'B'"),
    ("arc", {"question": "q", "choices": ["a", "b"], "answerKey": "A"}, "'choices' must be an object"),
    ("winogrande", {"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}, "no '_' blank"),
    ("winogrande", {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}, "answer must be '1' or '2'"),
])
def test_bad_items_name_the_problem(tmp_path, fmt, row, message):
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        load_task(path, fmt)
    assert "item 1" in str(e.value) and fmt in str(e.value)


def test_bad_inputs(tmp_path, ours):
    with pytest.raises(ValueError, match="unknown task format 'mmlu'"):
        load_task(task_file("piqa"), "mmlu")
    with pytest.raises(ValueError, match="unknown task format None"):
        load_task(task_file("piqa"))
    with pytest.raises(FileNotFoundError, match="no such task file"):
        load_task(str(tmp_path / "nope.jsonl"), "piqa")
    (tmp_path / "broken.jsonl").write_text('{"goal": "g"\n')
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        load_task(str(tmp_path / "broken.jsonl"), "piqa")
    with pytest.raises(ValueError, match="7-shot needs at least 8 items"):
        evaluate(ours, task_file("piqa"), "piqa", num_fewshot=7, progress=False)
    with pytest.raises(ValueError, match="empty"):
        perplexity(ours, "", progress=False)


def test_cli_errors(model_dir, tmp_path, capsys):
    for args, message in [(["--task", task_file("piqa"), "--task-format", "mmlu"], "unknown task format 'mmlu'"),
                          (["--task", task_file("piqa")], "unknown task format None"),
                          (["--text", str(tmp_path / "missing.txt")], "no such text file")]:
        with pytest.raises(SystemExit) as e:
            main(["eval", "--model", model_dir] + args)
        assert e.value.code == 1
        assert "slm eval: error: " in (err := capsys.readouterr().err) and message in err
    with pytest.raises(SystemExit):
        main(["eval", "--model", model_dir, "--task", task_file("arc"), "--task-format", "piqa"])
    assert "missing field 'goal'" in capsys.readouterr().err
