"""Tokenizer training and token shards."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from slm.data.prepare import DataError, load_tokens, prepare
from slm.runtime.tokenizer import EOT, Tokenizer, train_tokenizer
from support.cli import cli
from support.models import CORPUS

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


def test_tokenizer_train_says_when_it_gets_fewer_tokens_than_asked(tmp_path, capsys):
    """A small corpus runs out of merges: 4,096 asked, fewer given, and the note says so and why."""
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(DOCS))
    code, err = cli(capsys, "tokenizer", "train", "--data", src, "--vocab-size", 4096, "--out", tmp_path / "tok")
    assert code == 0, err
    got = Tokenizer.from_dir(str(tmp_path / "tok")).vocab_size
    assert got < 4096
    assert f"note: asked for --vocab-size 4,096, got {got:,}: BPE ran out of merges" in err
    code, err = cli(capsys, "tokenizer", "train", "--data", src, "--vocab-size", 300, "--out", tmp_path / "tok")
    assert code == 0 and "note:" not in err, err  # got what it asked for: no note
    for size in (10, 259, 2**40):
        code, err = cli(capsys, "tokenizer", "train", "--data", src, "--vocab-size", size, "--out", tmp_path / "t2")
        assert code == 2 and "argument --vocab-size: must be between 260" in err, err
    (tmp_path / "latin.txt").write_bytes("un café".encode("latin-1"))
    code, err = cli(capsys, "tokenizer", "train", "--data", tmp_path / "latin.txt", "--out", tmp_path / "t2")
    assert code == 1 and err.startswith(f"slm tokenizer train: error: {tmp_path / 'latin.txt'}: not UTF-8 text"), err
    assert not (tmp_path / "t2").exists()


def test_text_encodings(tmp_path, tok_dir):
    """UTF-8 with a BOM and UTF-16/32 with one are read as text; without a BOM, UTF-16 (NUL bytes)
    and a file no record of which is UTF-8 are one error naming the file; a record with a lone
    surrogate is skipped and counted (no tokenizer takes it)."""
    from collections import Counter
    from slm.data.prepare import read_documents
    docs = ["first document, café", "second one — 東京"]
    for name, encoding in [("sig.txt", "utf-8-sig"), ("le.txt", "utf-16"), ("be.txt", "utf-16-be"),
                           ("u32.txt", "utf-32")]:
        raw = "\r\n\r\n".join(docs).encode(encoding)
        if encoding == "utf-16-be":
            raw = b"\xfe\xff" + raw
        (tmp_path / name).write_bytes(raw)
        assert list(read_documents(str(tmp_path / name))) == docs, name
    rows = b"".join(json.dumps({"text": d}).encode("utf-16-le") + "\n".encode("utf-16-le") for d in docs)
    (tmp_path / "le.jsonl").write_bytes(b"\xff\xfe" + rows)
    assert list(read_documents(str(tmp_path / "le.jsonl"))) == docs
    (tmp_path / "sig.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps({"text": d}).encode() for d in docs))
    assert list(read_documents(str(tmp_path / "sig.jsonl"))) == docs
    (tmp_path / "nobom.txt").write_bytes("a document".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"nobom.txt: holds NUL bytes, so it is UTF-16 or UTF-32 text without a byte"):
        list(read_documents(str(tmp_path / "nobom.txt")))
    (tmp_path / "latin.txt").write_bytes("un café\n\nà la crème".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt: not UTF-8 text \(no record of it decodes\); convert it first"):
        list(read_documents(str(tmp_path / "latin.txt")))
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl: not UTF-8 text"):
        list(read_documents(str(tmp_path / "latin.jsonl")))
    (tmp_path / "bad16.txt").write_bytes(b"\xff\xfe" + b"\x00\xd8")  # a lone high surrogate in UTF-16
    with pytest.raises(DataError, match=r"bad16.txt: starts with a UTF-16-LE byte-order mark but is not UTF-16-LE"):
        list(read_documents(str(tmp_path / "bad16.txt")))
    (tmp_path / "sur.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 one"}\n')
    skipped = Counter()
    assert list(read_documents(str(tmp_path / "sur.jsonl"), skipped=skipped)) == ["ok"]
    assert skipped == {"lone surrogates (not UTF-8)": 1}
    meta = prepare(str(tmp_path / "sur.jsonl"), Tokenizer.from_dir(tok_dir), str(tmp_path / "out"), val_every=2,
                   progress=False)
    assert meta["skipped"] == {"lone surrogates (not UTF-8)": 1} and meta["train_docs"] == 1


def test_prepare_refuses_deep_json_and_leaves_no_partial_shards(tmp_path, tok_dir, capsys):
    tok = Tokenizer.from_dir(tok_dir)
    src = tmp_path / "deep.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS[:10]] + ['{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"]
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl:11: JSON nested too deeply to read"):
        prepare(str(src), tok, str(tmp_path / "out"), batch_docs=4, progress=False)
    assert os.listdir(tmp_path / "out") == []  # the shards begun are removed
    src.write_text("\n".join(lines[:10] + ['{"text": ' + "1" * 5000 + "}"]) + "\n")  # too many digits for Python
    meta = prepare(str(src), tok, str(tmp_path / "out"), progress=False)
    assert meta["skipped"] == {"malformed JSON": 1}
    code, err = cli(capsys, "data", "prepare", "--data", tmp_path / "deep.jsonl", "--tokenizer", tok_dir,
                    "--out", tmp_path / "o2", "--val-every", 1)
    assert code == 2 and "argument --val-every: must be at least 2, got 1" in err, err
    with pytest.raises(ValueError, match="--val-every must be an integer of at least 2"):
        prepare(str(src), tok, str(tmp_path / "o3"), val_every=0, progress=False)


def test_a_synthesized_corpus_is_reused_only_for_the_same_recipe(tmp_path):
    from slm.data.prepare import build_synthetic
    root = str(tmp_path / "data")
    tokens, tok = build_synthetic(root, 60, 300, progress=False)
    stamp = os.path.getmtime(os.path.join(tokens, "train.bin"))
    assert build_synthetic(root, 60, 300, progress=False) == (tokens, tok)
    assert os.path.getmtime(os.path.join(tokens, "train.bin")) == stamp  # reused, not rebuilt
    with pytest.raises(DataError, match=r"holds a corpus synthesized with --n-docs 60 \(now 80\)"):
        build_synthetic(root, 80, 300, progress=False)
    with pytest.raises(DataError, match=r"--vocab-size 300 \(now 400\), --seed 0 \(now 1\)"):
        build_synthetic(root, 60, 400, seed=1, progress=False)
