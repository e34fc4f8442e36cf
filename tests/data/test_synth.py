"""The synthetic corpus generator: determinism, uniqueness, splits, stats, arithmetic and grammar."""

from __future__ import annotations

import random
import re

import pytest

from slm.data import synth


@pytest.fixture(scope="module")
def sample():
    return list(synth.iter_documents_with_meta(123, 3000))


def test_deterministic_per_seed():
    assert list(synth.iter_documents(7, 200)) == list(synth.iter_documents(7, 200))
    assert list(synth.iter_documents(7, 200)) != list(synth.iter_documents(8, 200))


def test_no_duplicates_in_50k():
    seen = set()
    for d in synth.iter_documents(0, 50_000):
        seen.add(d)
    assert len(seen) == 50_000


def test_write_corpus_split(tmp_path):
    stats = synth.write_corpus(str(tmp_path), n_docs=600, seed=3, val_fraction=0.05)
    train = (tmp_path / "train.txt").read_text().strip("\n").split("\n\n")
    val = (tmp_path / "val.txt").read_text().strip("\n").split("\n\n")
    assert train and val and stats["n_train"] == len(train) and stats["n_val"] == len(val)
    assert len(train) + len(val) == 600
    assert not set(train) & set(val)
    assert (tmp_path / "stats.json").exists()
    assert stats["top_template_share"] < 0.3


def test_stats(sample):
    docs, metas = [d for d, _ in sample], [m["skeleton"] for _, m in sample]
    st = synth.corpus_stats(docs, metas)
    for key in ("n_docs", "n_words", "distinct_1", "distinct_2", "distinct_3", "duplicate_rate",
                "vocab_size", "top_template_share"):
        assert key in st
    assert st["n_docs"] == 3000 and st["n_words"] > 3000 * 60
    assert st["duplicate_rate"] == 0.0
    assert 0 < st["distinct_1"] < st["distinct_2"] < st["distinct_3"] <= 1
    assert st["distinct_2"] > 0.05
    assert st["top_template_share"] < 0.3
    assert synth.corpus_stats(["a b", "a b"])["duplicate_rate"] == 0.5


def test_mix_and_lengths(sample):
    stories = [d for d, m in sample if m["kind"] == "story"]
    assert 0.65 < len(stories) / len(sample) < 0.85
    assert all(80 <= len(d.split()) <= 250 for d in stories)
    assert all('"' in d for d in stories[:50]) or sum('"' in d for d in stories) > 0.7 * len(stories)


def test_vocabulary_size():
    words = set()
    for d in synth.iter_documents(5, 5000):
        words.update(w for w in re.findall(r"[a-z]+(?:'[a-z]+)?", d.lower()))
    assert 1000 <= len(words) <= 2500, len(words)


def test_no_blank_lines(sample):
    for d, _ in sample:
        assert "\n\n" not in d and d == d.strip()


def test_arithmetic_answers(sample):
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
    checked = 0
    for d, m in sample:
        for line in d.split("\n"):
            if not line.startswith("Answer:"):
                continue
            for a, op, b, c in re.findall(r"(\d+) ([+x-]) (\d+) = (\d+)", line):
                assert ops[op](int(a), int(b)) == int(c), line
                checked += 1
            for a, rel, b in re.findall(r"(\d+) is (more|less) than (\d+)", line):
                assert (int(a) > int(b)) == (rel == "more"), line
                checked += 1
        if m["skeleton"] in ("textbook/add", "textbook/sub", "textbook/mul"):
            # Every exercise's answer also agrees with the numbers in its question.
            lines = d.split("\n")
            for q, ans in zip(lines[2::2], lines[3::2]):
                nums = [int(x) for x in re.findall(r"\d+", q)]
                a, op, b, c = re.search(r"(\d+) ([+x-]) (\d+) = (\d+)", ans).groups()
                assert sorted(nums) == sorted([int(a), int(b)]), (q, ans)
    assert checked > 500


ART_EXCEPTIONS = {"unicorn", "uniform", "useful", "one", "honest", "hour", "university", "european"}


def test_articles_agree(sample):
    for d, _ in sample:
        for art, word in re.findall(r"\b([Aa]n?) ([A-Za-z]+)", d):
            w = word.lower()
            if w in ART_EXCEPTIONS:
                continue
            vowel = w[0] in "aeiou"
            assert (art.lower() == "an") == vowel, f"{art} {word}: {d}"


def test_pronouns_match_characters(sample):
    # Where every character in a story shares one gender, the other gender's pronouns never appear.
    other = {"she": r"\b(he|him|his)\b", "he": r"\b(she|her|hers)\b"}
    checked = 0
    for d, m in sample:
        if m["kind"] != "story":
            continue
        genders = {m["hero_gender"], m["friend_gender"], m["parent_gender"]}
        if len(genders) == 1:
            g = genders.pop()
            assert not re.search(other[g], d, re.IGNORECASE), d
            checked += 1
    assert checked > 50


def test_generate_document_api():
    rng = random.Random(0)
    docs = [synth.generate_document(rng) for _ in range(50)]
    assert all(isinstance(d, str) and d for d in docs)
    assert any(d.startswith("Lesson:") for d in docs)
