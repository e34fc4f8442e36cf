"""The synthetic corpus generator: determinism, uniqueness, splits, stats, arithmetic and grammar."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys

import pytest

from slm.data import lessons, synth, vocab


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
    world = [m["skeleton"] for d, m in sample if m["kind"] == "world"]
    assert abs(len(stories) / len(sample) - synth.STORY_SHARE) < 0.04
    assert abs(len(world) / len(sample) - synth.WORLD_SHARE) < 0.04
    assert {s.split("/")[1] for s in world} == set(lessons.LESSONS)  # every kind of fact is taught
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
        if m["skeleton"] == "world/counting":  # the counting lessons' scenes: x and y make x + y, ...
            for x, op, y, z in re.findall(r"(\d+) (and|take away) (\d+) (?:make|is) (\d+)", d):
                assert (int(x) + int(y) if op == "and" else int(x) - int(y)) == int(z), d
                checked += 1
            # Each scene, whatever its start and ending: the count, the number given or taken
            # (a word or a numeral), the count after; more is added, anything else taken away.
            number = re.compile(r"\b(\d+|" + "|".join(vocab.NUM_WORDS) + r")\b")
            for scene in d.split("\n")[1:]:
                x, y, z = (int(n) if n.isdigit() else vocab.NUM_WORDS.index(n) for n in number.findall(scene)[:3])
                assert (x + y if " more" in scene else x - y) == z, scene
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


def test_write_corpus_refuses_bad_arguments_and_writes_whole_files(tmp_path, monkeypatch):
    for n in (-5, 0, 1, 2.5, True):
        with pytest.raises(ValueError, match="--n-docs must be an integer of at least 2"):
            synth.write_corpus(str(tmp_path / "a"), n_docs=n)
    with pytest.raises(ValueError, match="--seed must be a non-negative integer"):
        synth.write_corpus(str(tmp_path / "a"), n_docs=10, seed=-1)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        synth.write_corpus(str(tmp_path / "f"), n_docs=10)
    assert sorted(os.listdir(tmp_path)) == ["f"]
    # a corpus the disk cannot hold is refused before a document is written
    usage = shutil.disk_usage
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: usage(path)._replace(free=10**6))
    with pytest.raises(ValueError, match=r"--n-docs 100,000 needs at least 0.0 GB .* has 0.0 GB free"):
        synth.write_corpus(str(tmp_path / "big"), n_docs=100_000)
    assert os.listdir(tmp_path / "big") == []
    monkeypatch.undo()

    def failing(rng):  # the generator fails half-way: no half corpus is left for `data prepare` to read
        if failing.n == 50:
            raise MemoryError
        failing.n += 1
        return real(rng)
    real, failing.n = synth.generate_document_with_meta, 0
    monkeypatch.setattr(synth, "generate_document_with_meta", failing)
    with pytest.raises(MemoryError):
        synth.write_corpus(str(tmp_path / "half"), n_docs=100)
    assert os.listdir(tmp_path / "half") == []


def test_data_synth_cli_refuses_bad_numbers(tmp_path):
    for flags, message in [(["--n-docs", "-5"], "argument --n-docs: must be at least 2, got -5"),
                           (["--n-docs", "1"], "argument --n-docs: must be at least 2, got 1"),
                           (["--seed", "-3"], "argument --seed: must be at least 0, got -3")]:
        r = subprocess.run([sys.executable, "-m", "slm", "data", "synth", "--out", str(tmp_path / "c"), *flags],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("slm data synth: error: " + message), r.stderr
        assert not (tmp_path / "c").exists()
