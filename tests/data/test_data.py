"""Tokenizer training and token shards."""

import json
import subprocess
import sys

import numpy as np
import pytest

from support.models import CORPUS
from slm.data.prepare import DataError, load_tokens, prepare
from slm.runtime.tokenizer import EOT, Tokenizer, train_tokenizer

DOCS = [f"Story {i}. " + CORPUS[i % 5] + f" The end of story {i}." for i in range(200)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(DOCS, vocab_size=400).save(path)
    return path


def test_trained_tokenizer_round_trip_and_transformers(tok_dir):
    from transformers import AutoTokenizer
    ours, ref = Tokenizer.from_dir(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    for text in ["Once upon a time, Lily counted 3 apples.", "naïve café — 東京 🙂\n\ttabs  and  spaces", ""]:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"]
        assert ids[0] == ours.token_id(EOT)  # documents start after an end-of-text token
        assert ours.decode(ids) == text == ref.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == 400


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size must be at least 260"):
        train_tokenizer(DOCS, vocab_size=100)


def test_prepare_txt_splits_by_document(tmp_path, tok_dir):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(DOCS))
    tok = Tokenizer.from_dir(tok_dir)
    meta = prepare(str(src), tok, str(tmp_path / "out"), val_every=10, progress=False)
    assert meta["train_docs"] == 180 and meta["val_docs"] == 20 and meta["skipped"] == {}
    eot = tok.token_id(EOT)
    docs = {}
    for split in ("train", "val"):
        ids = load_tokens(str(tmp_path / "out"), split)
        assert len(ids) == meta[f"{split}_tokens"] and ids.dtype == np.uint16
        pieces = np.split(np.asarray(ids), np.where(np.asarray(ids) == eot)[0] + 1)[:-1]
        docs[split] = [tok.decode(p[:-1].tolist()) for p in pieces]
    assert docs["val"] == [d for i, d in enumerate(DOCS) if i % 10 == 9]
    assert set(docs["train"]) | set(docs["val"]) == set(DOCS)
    assert not set(docs["train"]) & set(docs["val"])


def test_prepare_keeps_an_existing_split(tmp_path, tok_dir):
    d = tmp_path / "in"
    d.mkdir()
    (d / "train.txt").write_text("\n\n".join(DOCS[:150]))
    (d / "val.txt").write_text("\n\n".join(DOCS[150:]))
    meta = prepare(str(d), Tokenizer.from_dir(tok_dir), str(tmp_path / "out"), progress=False)
    assert (meta["train_docs"], meta["val_docs"]) == (150, 50)


def test_prepare_jsonl_counts_bad_records(tmp_path, tok_dir):
    src = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": d}).encode() for d in DOCS[:20]]
    lines += [b'{"text": "caf\xe9 in latin-1"}', b"{not json", json.dumps({"text": ""}).encode()]
    src.write_bytes(b"\n".join(lines) + b"\n")
    meta = prepare(str(src), Tokenizer.from_dir(tok_dir), str(tmp_path / "out"), progress=False)
    assert meta["train_docs"] + meta["val_docs"] == 20
    assert meta["skipped"] == {"undecodable UTF-8": 1, "malformed JSON": 1, "empty text": 1}


def test_prepare_errors(tmp_path, tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:1: no field 'text' \(use --field"):
        prepare(str(src), tok, str(tmp_path / "out"), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    with pytest.raises(DataError, match="empty.txt: no usable documents"):
        prepare(str(empty), tok, str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match="no such file or folder"):
        prepare(str(tmp_path / "missing"), tok, str(tmp_path / "out"), progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"x.csv: unsupported file type"):
        prepare(str(tmp_path / "x.csv"), tok, str(tmp_path / "out"), progress=False)


def test_parquet(tmp_path, tok_dir):
    src = str(tmp_path / "data.parquet")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        open(src, "wb").write(b"PAR1")
        with pytest.raises(DataError, match="needs pyarrow"):
            prepare(src, Tokenizer.from_dir(tok_dir), str(tmp_path / "out"), progress=False)
        return
    pq.write_table(pa.table({"text": DOCS[:30]}), src)
    meta = prepare(src, Tokenizer.from_dir(tok_dir), str(tmp_path / "out"), progress=False)
    assert meta["train_docs"] + meta["val_docs"] == 30


def test_cli_tokenizer_train_and_prepare(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(DOCS))
    run = lambda *a: subprocess.run([sys.executable, "-m", "slm", *a], capture_output=True, text=True)  # noqa: E731
    r = run("tokenizer", "train", "--data", str(src), "--vocab-size", "350", "--out", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    r = run("data", "prepare", "--data", str(src), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert "train tokens" in r.stdout
    r = run("data", "prepare", "--data", str(tmp_path / "nope.txt"), "--tokenizer", str(tmp_path / "tok"),
            "--out", str(tmp_path / "d"))
    assert r.returncode == 1 and "slm data prepare: error:" in r.stderr and "Traceback" not in r.stderr
