"""Text files -> token shards: the uint16/uint32 memmaps the training loop reads.

Input: a .txt file (documents separated by blank lines), a .jsonl file (one JSON object per line,
text in `field`), a .parquet file (column `field`, needs pyarrow), or a folder of such files. A
folder holding train.* and val.* files (as `slm data synth` writes) keeps that split; otherwise
every `val_every`-th document goes to validation, so the two never share a document.
Output in DIR: train.bin, val.bin (token ids, each document followed by the end-of-text token)
and meta.json. Bad records are never dropped silently: they are counted, reported and written to
meta.json.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from collections import Counter
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from ..runtime.tokenizer import EOT, Tokenizer, train_tokenizer
from ..files import output_folder, read_json_object, write_json
from .scrub import scrub_text, text_encoding
from .synth import write_corpus

EXTENSIONS = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """Input that cannot be turned into training data, with the file named."""


def _utf8(text: str, skipped: Counter) -> bool:
    """Whether text can be tokenized: a JSON string may hold lone surrogates ("\\ud800"), which
    no UTF-8 tokenizer takes; such a record is counted and skipped."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        skipped["lone surrogates (not UTF-8)"] += 1
        return False


def _encoding(path: str, head: bytes) -> tuple[str, bytes]:
    """(encoding, byte-order mark) of a file from its first bytes (scrub.text_encoding)."""
    try:
        return text_encoding(path, head)
    except ValueError as e:
        raise DataError(str(e)) from None


def _decode_whole(path: str, raw: bytes, encoding: str, bom: bytes) -> str:
    """A UTF-16/32 file (it has a byte-order mark) as text; UTF-8 is decoded record by record
    instead, so that a bad record is skipped and counted rather than the whole file refused."""
    try:
        return raw[len(bom):].decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: starts with a {encoding.upper()} byte-order mark but is not {encoding.upper()} "
                        f"({e.reason} at byte {e.start + len(bom)})") from None


def _none_decoded(path: str) -> DataError:
    return DataError(f"{path}: not UTF-8 text (no record of it decodes); convert it first, e.g. "
                     f"`iconv -f LATIN1 -t UTF-8 {os.path.basename(path)}`")


def _txt_docs(path: str, skipped: Counter) -> Iterator[str]:
    with open(path, "rb") as f:
        raw = f.read()
    encoding, bom = _encoding(path, raw[:65536])
    if encoding != "utf-8":
        text = _decode_whole(path, raw, encoding, bom)
        yield from (d.strip() for d in re.split(r"\n\r?\n", text) if d.strip() and _utf8(d, skipped))
        return
    raw = raw[len(bom):]
    good = bad = 0
    for block in re.split(rb"\n\r?\n", raw):  # blank lines, also of Windows (CRLF) files
        try:
            text = block.decode("utf-8").strip()
        except UnicodeDecodeError:
            skipped["undecodable UTF-8"] += 1
            bad += 1
            continue
        good += 1
        if text:
            yield text
    if bad and not good:
        raise _none_decoded(path)


def _jsonl_docs(path: str, field: str, skipped: Counter) -> Iterator[str]:
    with open(path, "rb") as f:
        yield from _jsonl_records(path, field, skipped, f)


def _jsonl_records(path: str, field: str, skipped: Counter, f) -> Iterator[str]:
    encoding, bom = _encoding(path, f.read(65536))
    f.seek(0)
    # UTF-16/32: decoded whole (such files are rare); UTF-8 streams line by line
    lines = _decode_whole(path, f.read(), encoding, bom).splitlines() if encoding != "utf-8" else f
    good = bad = 0
    for n, line in enumerate(lines, 1):
        if n == 1 and isinstance(line, bytes):
            line = line.removeprefix(b"\xef\xbb\xbf")
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
        except UnicodeDecodeError:
            skipped["undecodable UTF-8"] += 1
            bad += 1
            continue
        except RecursionError:
            raise DataError(f"{path}:{n}: JSON nested too deeply to read") from None
        except ValueError:  # not JSON, or a number of more digits than Python converts
            skipped["malformed JSON"] += 1
            good += 1
            continue
        good += 1
        if not isinstance(obj, dict) or field not in obj:
            raise DataError(f"{path}:{n}: no field {field!r} (use --field to name the text field)")
        text = obj[field]
        if not isinstance(text, str):
            skipped[f"non-string {field!r}"] += 1
        elif not _utf8(text, skipped):
            continue
        elif text.strip():
            yield text.strip()
        else:
            skipped["empty text"] += 1
    if bad and not good:
        raise _none_decoded(path)


def _parquet_docs(path: str, field: str, skipped: Counter) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    if field not in table.column_names:
        raise DataError(f"{path}: no column {field!r}; columns: {', '.join(table.column_names)}")
    for text in table.column(field).to_pylist():
        if isinstance(text, str) and text.strip():
            yield text.strip()
        else:
            skipped["empty or non-string text"] += 1


def read_documents(path: str, field: str = "text", skipped: Counter | None = None) -> Iterator[str]:
    skipped = skipped if skipped is not None else Counter()
    if path.endswith(".txt"):
        return _txt_docs(path, skipped)
    if path.endswith(".jsonl"):
        return _jsonl_docs(path, field, skipped)
    if path.endswith(".parquet"):
        return _parquet_docs(path, field, skipped)
    raise DataError(f"{path}: unsupported file type (use {', '.join(EXTENSIONS)})")


def input_files(path: str) -> tuple[list[str], list[str]]:
    """(train files, val files); val files empty when the split is to be made here."""
    if os.path.isfile(path):
        return [path], []
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or folder")
    files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(EXTENSIONS))
    if not files:
        raise DataError(f"{path}: no {', '.join(EXTENSIONS)} files")
    val = [f for f in files if os.path.basename(f).startswith("val.")]
    train = [f for f in files if f not in val]
    return train, val


def prepare(data: str, tokenizer: Tokenizer, out: str, field: str = "text", val_every: int = 50,
            batch_docs: int = 2048, progress: bool = True, scrub_pii: bool = False) -> dict:
    """scrub_pii: replace e-mail addresses, phone numbers, card numbers, ... by [EMAIL], [PHONE], ...
    (data/scrub.py) before tokenizing; meta.json counts them under "pii_redacted"."""
    if not isinstance(val_every, int) or isinstance(val_every, bool) or val_every < 2:
        raise ValueError(f"--val-every must be an integer of at least 2 (1 would leave no training data), got {val_every}")
    output_folder(out)
    train_files, val_files = input_files(data)
    pii: Counter = Counter()
    eot = tokenizer.token_id(EOT) if tokenizer.token_id(EOT) is not None else tokenizer.eos_id
    if eot is None:
        raise DataError("the tokenizer has no end-of-text / EOS token to separate documents")
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    os.makedirs(out, exist_ok=True)
    skipped: Counter = Counter()
    counts = {"train": [0, 0], "val": [0, 0]}  # documents, tokens
    tmp = {split: open(os.path.join(out, f".{split}.bin.tmp"), "wb") for split in counts}
    bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress)

    def flush(split: str, docs: list[str]) -> None:
        # encode_batch runs on every core (the tokenizers library's own thread pool)
        for enc in tokenizer.tk.encode_batch(docs, add_special_tokens=False):
            ids = np.array(enc.ids + [eot], dtype=dtype)
            ids.tofile(tmp[split])
            counts[split][0] += 1
            counts[split][1] += len(ids)
        bar.update(len(docs))

    def run(files: list[str], split_of) -> None:
        batch = {"train": [], "val": []}
        i = 0
        for path in files:
            for doc in read_documents(path, field, skipped):
                doc = scrub_text(doc, pii)[0] if scrub_pii else doc
                split = split_of(i)
                i += 1
                batch[split].append(doc)
                if len(batch[split]) >= batch_docs:
                    flush(split, batch[split])
                    batch[split] = []
        for split, docs in batch.items():
            if docs:
                flush(split, docs)

    try:
        try:
            if val_files:  # the input's own split
                run(train_files, lambda i: "train")
                run(val_files, lambda i: "val")
            else:  # every val_every-th document
                run(train_files, lambda i: "val" if i % val_every == val_every - 1 else "train")
        finally:
            bar.close()
            for f in tmp.values():
                f.close()
        if counts["train"][0] == 0:
            raise DataError(f"{data}: no usable documents" + (f" (skipped: {dict(skipped)})" if skipped else ""))
    except BaseException:  # no half-written shard is left behind
        for f in tmp.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(f.name)
        raise
    for split in counts:
        os.replace(os.path.join(out, f".{split}.bin.tmp"), os.path.join(out, f"{split}.bin"))
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "eot_id": eot,
            "train_docs": counts["train"][0], "train_tokens": counts["train"][1],
            "val_docs": counts["val"][0], "val_tokens": counts["val"][1], "skipped": dict(skipped)}
    if scrub_pii:
        meta["pii_redacted"] = dict(sorted(pii.items()))
    write_json(os.path.join(out, "meta.json"), meta)
    return meta


def load_meta(out: str) -> dict:
    """meta.json of a folder written by `slm data prepare` (dtype, vocab_size, token counts)."""
    path = os.path.join(out, "meta.json")
    if not os.path.isdir(out):
        raise DataError(f"{out}: no such data folder (make one with `slm data prepare`)")
    if not os.path.exists(path):
        raise DataError(f"{out}: no meta.json, so not a folder written by `slm data prepare`")
    try:
        meta = read_json_object(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{path}: 'dtype' must be uint16 or uint32, got {meta.get('dtype')!r}")
    return meta


def load_tokens(out: str, split: str) -> np.ndarray:
    """The token ids of one split as a read-only memmap."""
    meta = load_meta(out)
    path = os.path.join(out, f"{split}.bin")
    if not os.path.exists(path):
        raise DataError(f"{path}: missing (the {split} split of `slm data prepare`)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty, no {split} tokens")
    if os.path.getsize(path) % np.dtype(meta["dtype"]).itemsize:
        raise DataError(f"{path}: {os.path.getsize(path)} bytes is not a whole number of {meta['dtype']} tokens (truncated?)")
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def build_synthetic(root: str, n_docs: int, vocab_size: int, seed: int = 0, progress: bool = True) -> tuple[str, str]:
    """The built-in corpus, end to end: synthesize text into root/text, train a tokenizer on its
    training split (root/tokenizer), and write token shards (root/tokens). Reused when present and
    made with the same n_docs, vocab_size and seed (root/synth.json); made otherwise with others,
    it is refused rather than silently used. Returns (tokens folder, tokenizer folder)."""
    text, tok_dir, tokens = (os.path.join(root, d) for d in ("text", "tokenizer", "tokens"))
    recipe = {"n_docs": n_docs, "vocab_size": vocab_size, "seed": seed}
    made = os.path.join(root, "synth.json")
    if os.path.exists(os.path.join(tokens, "meta.json")):
        earlier = read_json_object(made) if os.path.exists(made) else recipe  # older runs wrote no synth.json
        if earlier != recipe:
            diff = ", ".join(f"--{k.replace('_', '-')} {earlier.get(k)} (now {v})" for k, v in recipe.items()
                             if earlier.get(k) != v)
            raise DataError(f"{root} holds a corpus synthesized with {diff}: use the same flags, or delete {root} "
                            "to synthesize a new one")
        return tokens, tok_dir
    write_corpus(text, n_docs, seed=seed)
    train_tokenizer(read_documents(os.path.join(text, "train.txt")), vocab_size).save(tok_dir)
    prepare(text, Tokenizer.from_dir(tok_dir), tokens, progress=progress)
    write_json(made, recipe)
    return tokens, tok_dir
