"""GGUF tokenizers against llama.cpp's own (llama-cpp-python, vocab_only): the same token ids for
every tokenizer.ggml.pre value slm knows, on text that makes the pre-tokenizers differ.

A pre value is tested on a real byte-level vocabulary, SmolLM2's (its tokens, types and 48,900
merges), written to a GGUF file with tokenizer.ggml.pre set to the value and no
tokenizer.ggml.add_bos_token, so that llama.cpp's own default for the value decides BOS. One token
is added that the merges never make (" zzqx"): whole-word lookup (ignore_merges) finds it, BPE does not.
Under CI=true a missing llama_cpp or SmolLM2 fails instead of skipping."""

from __future__ import annotations

import ctypes
import json
import os
import struct

import pytest

import slm
from slm.checkpoint.gguf import read_gguf
from slm.checkpoint.gguf_tokenizer import PRE_TOKENIZERS
from slm.checkpoint.safetensors_io import CheckpointError
from slm.runtime.tokenizer import Tokenizer
from support.llamacpp import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Multilingual text, code and whitespace: where the pre-tokenizers of the table differ.
TEXT = (
    "Hello, World! It's a dog's life; we'll see, they're here, I've been, I'm, you'd, DON'T SHOUT 'quoted' "
    "rock'n'roll, O'Neil's.\n"
    "Numbers: 1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 2024-06-01 0x1F 1e-5 \u00bd \u00b2 \u0663\u0664\u0665\n"
    "Fran\u00e7ais: d\u00e9j\u00e0 vu, na\u00efve caf\u00e9, \u00c6sir \u00d8nske stra\u00dfe; "
    "Espa\u00f1ol: \u00bfQu\u00e9 tal? \u00a1Ol\u00e9!\n"
    "\u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442: \u041f\u0440\u0438\u0432\u0435\u0442, "
    "\u043c\u0438\u0440! \u0401\u043b\u043a\u0430. \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac: "
    "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1.\n"
    "\u4e2d\u6587\uff1a\u4f60\u597d\uff0c\u4e16\u754c\uff01\u65e5\u672c\u8a9e\uff1a\u3053\u3093\u306b\u3061\u306f"
    "\u3001\u4e16\u754c\u3002\u30ab\u30bf\u30ab\u30ca\u3002\ud55c\uad6d\uc5b4: \uc548\ub155\ud558\uc138\uc694 \uc138\uacc4.\n"
    "\u0939\u093f\u0928\u094d\u0926\u0940: \u0928\u092e\u0938\u094d\u0924\u0947\u0964 "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629: \u0645\u0631\u062d\u0628\u0627\u060c \u0643\u064a\u0641\u061f\n"
    "Emoji: \U0001f44b\U0001f3fd \U0001f1eb\U0001f1f7 \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f "
    "\u2728\U0001f680!!\n"
    "def f(x):\n\tif x  >=  10:\n\t\treturn x**2 // 3  # comment\r\n    else:\r\n"
    "        return {'a': [1, 2], \"b\": None}  // $5 + 3 = <8> ^ ~ | `tick`\n"
    "   leading,  two,   three,    four\t\ttabs \t mixed \n\n\n\nnewlines\r\n\r\nCRLF   \n  \n"
    "MixedCase camelCaseWord XMLHttpRequest iPhone McDONALD's ABCdef \u00c9cole \u00e9COLE\n"
    "\u00a0nbsp\u00a0and\u3000ideographic\u2009thin \u3000\u3002\u300c\u5f15\u7528\u300d\u2026\n"
    " zzqx zzqx, trailing   "
)
SPECIAL = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def vocab_only(path: str):
    """llama.cpp's tokenizer of the file: the vocabulary alone, no weights."""
    return llama_cpp().Llama(path, vocab_only=True, verbose=False)


def llama_detokenize(llm, ids: list[int]) -> str:
    """llama.cpp's detokenize (which applies its clean_spaces; Llama.detokenize does not)."""
    lib = llama_cpp()
    buf = ctypes.create_string_buffer(4096)
    arr = (lib.llama_token * len(ids))(*ids)
    n = lib.llama_detokenize(llm._model.vocab, arr, len(ids), buf, len(buf), False, False)
    return buf.raw[:n].decode()


def vocab_gguf(path: str, tokens: list[str], types: list[int], merges: list[str], bos: int, eos: int) -> bytes:
    """The bytes of a GGUF file of this vocabulary, tokenizer.ggml.pre "@PRE@" (replaced per test),
    and the little a llama architecture needs for llama.cpp to load its vocabulary."""
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    for key, value in (("block_count", 1), ("context_length", 512), ("embedding_length", 64),
                       ("feed_forward_length", 128), ("attention.head_count", 2), ("attention.head_count_kv", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("@PRE@")
    w.add_token_list(tokens + ["\u0120zzqx"])  # " zzqx": a token no merge makes
    w.add_token_types(types + [1])
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2_gguf, tmp_path_factory) -> bytes:
    """SmolLM2's vocabulary: 49,152 tokens and 48,900 merges of a real model."""
    meta = read_gguf(smollm2_gguf).metadata
    return vocab_gguf(str(tmp_path_factory.mktemp("vocab") / "smollm2.gguf"), meta["tokenizer.ggml.tokens"],
                      meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.merges"],
                      meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"])


@pytest.fixture(scope="module")
def crossing_vocab(tmp_path_factory) -> bytes:
    """A byte-level BPE vocabulary trained without any pre-tokenizer on TEXT (less " zzqx") and the
    README: its merges join across spaces, digits, punctuation and scripts, so wherever two
    pre-tokenizers cut the text differently, the ids differ (SmolLM2's merges never cross its own cuts)."""
    from tokenizers import Tokenizer as Tk
    from tokenizers import models, pre_tokenizers, trainers
    tk = Tk(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    corpus = [TEXT.replace(" zzqx", "")] * 3 + [readme[i:i + 300] for i in range(0, len(readme), 300)]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=3000, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tk.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [3 if t in special else 1 for t in tokens]
    return vocab_gguf(str(tmp_path_factory.mktemp("vocab") / "crossing.gguf"), tokens, types,
                      [" ".join(m) for m in model["merges"]], 0, 0)


def with_pre(base: bytes, pre: str | None, path) -> str:
    """The vocabulary file with tokenizer.ggml.pre set to pre (None: the key left out)."""
    key = b"tokenizer.ggml.pre"
    old = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", 5) + b"@PRE@"
    i = base.index(old)
    if pre is None:
        new = b""
        n_kv = struct.unpack_from("<Q", base, 16)[0] - 1  # the header's key count (after magic, version, tensor count)
        base = base[:16] + struct.pack("<Q", n_kv) + base[24:]
    else:
        new = old[:-13] + struct.pack("<Q", len(pre.encode())) + pre.encode()
    path.write_bytes(base[:i] + new + base[i + len(old):])
    return str(path)


@pytest.mark.llamacpp
@pytest.mark.parametrize("vocab", [pytest.param("smollm2_vocab", marks=pytest.mark.smollm2), "crossing_vocab"])
@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS), ids=lambda p: str(p))
def test_pre_tokenizer_equals_llama_cpp(pre, vocab, request, tmp_path):
    path = with_pre(request.getfixturevalue(vocab), pre, tmp_path / "vocab.gguf")
    ours = Tokenizer(*read_gguf(path).tokenizer())
    llm = vocab_only(path)
    # plain text, no BOS, control tokens not parsed (slm's encode without special tokens)
    assert ours.encode(TEXT, add_special_tokens=False) == llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    # as slm encodes a prompt: BOS where llama.cpp adds one for this value, control tokens parsed
    text = SPECIAL + TEXT
    assert ours.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True)
    # whole-word lookup as llama.cpp does it for this value
    zzqx = ours.token_id("\u0120zzqx")
    assert (zzqx in ours.encode(" zzqx", add_special_tokens=False)) == PRE_TOKENIZERS[pre].ignore_merges
    # clean_spaces: llama.cpp's detokenize drops the space of " ." for exactly these values
    ids = ours.encode("a . b", add_special_tokens=False)
    assert (llama_detokenize(llm, ids) == "a. b") == ours.config["clean_up_tokenization_spaces"]
    llm.close()


@pytest.mark.llamacpp
@pytest.mark.smollm2
def test_smollm2_long_real_text_equals_llama_cpp(smollm2_gguf):
    """SmolLM2's own file on this repository's README and docs: the same ids as llama.cpp."""
    docs = os.path.join(ROOT, "docs")
    parts = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    texts = []
    for p in parts:
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
    text = "\n\n".join(texts)
    assert len(text) > 100_000
    ours = slm.load(smollm2_gguf).tokenizer
    llm = vocab_only(smollm2_gguf)
    theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
    assert ours.encode(text) == theirs
    llm.close()


@pytest.mark.llamacpp
@pytest.mark.gemma
def test_gemma_spm_equals_llama_cpp(gemma_gguf):
    ours = Tokenizer(*read_gguf(gemma_gguf).tokenizer())
    llm = vocab_only(gemma_gguf)
    text = "<start_of_turn>user\n" + TEXT
    assert ours.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True)
    assert ours.encode(TEXT, add_special_tokens=False) == llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    llm.close()


@pytest.mark.llamacpp
def test_unknown_pre_names_the_value_and_the_way_out(crossing_vocab, tmp_path):
    path = with_pre(crossing_vocab, "brand-new-bpe", tmp_path / "vocab.gguf")
    with pytest.raises(CheckpointError) as e:
        read_gguf(path).tokenizer()
    msg = str(e.value)
    assert "\n" not in msg and "'brand-new-bpe'" in msg and "--tokenizer DIR" in msg and "tokenizer.json" in msg


@pytest.fixture(scope="module")
def renamed_smollm2(smollm2_gguf, tmp_path_factory) -> tuple[str, str]:
    """SmolLM2's file with its pre value renamed to one nobody knows ("smolXX"), and a folder with
    the tokenizer.json slm builds from the original file."""
    d = tmp_path_factory.mktemp("renamed")
    with open(smollm2_gguf, "rb") as f:
        data = f.read()
    key = b"tokenizer.ggml.pre" + struct.pack("<IQ", 8, 6)
    i = data.index(key + b"smollm") + len(key)
    (d / "renamed.gguf").write_bytes(data[:i] + b"smolXX" + data[i + 6:])  # same length: nothing else moves
    Tokenizer(*read_gguf(smollm2_gguf).tokenizer()).save(str(d / "tok"))
    return str(d / "renamed.gguf"), str(d / "tok")


@pytest.mark.smollm2
def test_tokenizer_dir_replaces_an_unknown_pre(smollm2_gguf, renamed_smollm2, tmp_path, capsys):
    """slm.load refuses the renamed file with the way out; --tokenizer DIR (slm.load(tokenizer=DIR))
    runs it with the tokenizer.json of DIR: the same ids and greedy text as the original."""
    renamed, tok = renamed_smollm2
    with pytest.raises(CheckpointError, match="unknown pre-tokenizer 'smolXX'.*--tokenizer DIR"):
        slm.load(renamed)
    original = slm.load(smollm2_gguf)
    lm = slm.load(renamed, tokenizer=tok)
    assert lm.tokenizer.encode(TEXT) == original.tokenizer.encode(TEXT)
    from slm.cli import main
    args = ["--prompt", "The capital of France is", "--max-new-tokens", "4", "--temperature", "0", "--no-receipt-summary"]
    main(["generate", "--model", smollm2_gguf, *args])
    expected = capsys.readouterr().out
    main(["generate", "--model", renamed, "--tokenizer", tok, *args])
    assert capsys.readouterr().out == expected
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        slm.load(renamed, tokenizer=str(tmp_path))


@pytest.mark.smollm2
def test_serve_takes_tokenizer_dir(smollm2_gguf, renamed_smollm2, tmp_path):
    """slm serve --tokenizer DIR: the renamed file serves the original's greedy completion."""
    from support.server import Server
    renamed, tok = renamed_smollm2
    expected = slm.load(smollm2_gguf).generate("The capital of France is", max_new_tokens=4, temperature=0)
    server = Server(renamed, str(tmp_path / "server.log"), "--tokenizer", tok)
    try:
        r = server.client().completions.create(model="renamed", prompt="The capital of France is", max_tokens=4,
                                               temperature=0)
        assert r.choices[0].text == expected
    finally:
        server.stop()


def test_docs_table_lists_every_value():
    """docs/running.md's table of GGUF pre-tokenizers names exactly the values of the table, each once."""
    import re
    with open(os.path.join(ROOT, "docs", "running.md"), encoding="utf-8") as f:
        doc = f.read()
    section = doc[doc.index("### GGUF tokenizers"):]
    section = section[:section.index("\n## ")]
    rows = [line.split("|")[2] for line in section.splitlines()[1:] if line.startswith("| ") and "values" not in line]
    names = [n for row in rows for n in re.findall(r"`([^`]+)`", row)]
    assert sorted(names) == sorted(p for p in PRE_TOKENIZERS if p is not None)
