"""A GGUF file's tokenizer (tokenizer.ggml.* metadata) rebuilt as a `tokenizers.Tokenizer`.

llama.cpp stores a vocabulary, its token types and either BPE merges (byte-level vocabularies,
`gpt2`) or scores (SentencePiece vocabularies, `llama`), the special tokens' ids and a chat
template. `build_tokenizer` returns what it reads, a `GGUFTokenizer`: the `tokenizers.Tokenizer`,
the tokenizer_config.json-style settings (special tokens, add_bos_token) and the chat template;
`slm.runtime.tokenizer.Tokenizer(*parts)` makes slm's tokenizer of it.
"""

from __future__ import annotations

from typing import NamedTuple

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Tk

from .safetensors_io import CheckpointError


class GGUFTokenizer(NamedTuple):
    tk: Tk
    config: dict  # bos_token, eos_token, unk_token, pad_token, add_bos_token, add_eos_token
    chat_template: str | None


_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)

# Byte-level vocabularies: the split before byte-level BPE, by tokenizer.ggml.pre. None: ByteLevel's own (GPT-2).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_SPLITS = {None: None, "default": None, "gpt-2": None, "phi-2": None,
           "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           # every digit alone, then GPT-2's split of the pieces between (a list: applied in turn)
           "smollm": [r"\p{N}", _GPT2_SPLIT]}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _spm_merges(tokens: list[str], vocab: dict[str, int], rank) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-ranked token first, longer left piece first -- transformers' `generate_merges` order, found
    with one dict lookup per split instead of its per-token sorts."""
    found = []
    for i, tok in enumerate(tokens):
        for k in range(len(tok) - 1, 0, -1):
            left = tok[:k]
            if left in vocab and tok[k:] in vocab:
                found.append((rank[i], left, tok[k:]))
    found.sort(key=lambda x: (-x[0], -len(x[1]), -len(x[2])))  # stable: ties keep vocabulary order
    return [(left, right) for _, left, right in found]


def build_tokenizer(meta: dict, path: str, ranks_by_order: bool = False) -> GGUFTokenizer:
    """The tokenizer the metadata of the GGUF file `path` describes. ranks_by_order: the merges
    of a SentencePiece vocabulary rank by token order, not by score (the family's
    gguf_ranks_by_order: Gemma)."""
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind not in ("llama", "gpt2") or not tokens:
        raise CheckpointError(f"{path}: cannot build a tokenizer from tokenizer.ggml.model {kind!r}; slm reads "
                              "'llama' (SentencePiece) and 'gpt2' (byte-level BPE) vocabularies")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    named = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            named[name] = tokens[i]

    if kind == "llama":
        # llama.cpp writes a token of spaces with real spaces where SentencePiece means U+2581, the
        # character every space becomes before BPE: respell them, or they could never match.
        spelled = [t.replace(" ", "\u2581") if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        # A merge ranks as the token it makes, by score. Gemma's scores do not follow its merge order,
        # its vocabulary order does (and serves for a file without scores, too).
        rank = meta.get("tokenizer.ggml.scores") or []
        if ranks_by_order or len(rank) != len(tokens):
            rank = range(0, -len(tokens), -1)
        unk = named.get("unk_token", "<unk>" if "<unk>" in vocab else None)
        tk = Tk(models.BPE(vocab, _spm_merges(spelled, vocab, rank), unk_token=unk, fuse_unk=True, byte_fallback=True))
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if meta.get("tokenizer.ggml.add_space_prefix", True):  # Llama 2: "Hi" is encoded as "▁Hi"
            tk.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="first", split=False)
            dec.append(decoders.Strip(" ", 1, 0))
        else:  # Gemma
            tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.decoder = decoders.Sequence(dec)
        default_bos = True  # what llama.cpp does for SentencePiece vocabularies that do not say
    else:
        pre = meta.get("tokenizer.ggml.pre")
        if pre not in _SPLITS:
            raise CheckpointError(f"{path}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); slm knows "
                                  f"{', '.join(p for p in _SPLITS if p)}")
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # Added tokens outside the byte alphabet (runs of real spaces) are respelled as their bytes.
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tk = Tk(models.BPE(vocab, merges, fuse_unk=False))
        if _SPLITS[pre]:
            splits = _SPLITS[pre] if isinstance(_SPLITS[pre], list) else [_SPLITS[pre]]
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        default_bos = False

    # Control tokens (<bos>, <start_of_turn>) are special, user-defined ones (<b>, "\n\n") plain added
    # tokens: llama.cpp matches both whole in the text, so BPE must not cut them up. A token respelled
    # above is no longer in the vocabulary under its file spelling, and is left to BPE, as transformers does.
    special = [t for t, ty in zip(tokens, types) if ty == _CONTROL and t in vocab]
    special += [t for t in named.values() if t in vocab and t not in special]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and named.get("bos_token") in vocab
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and named.get("eos_token") in vocab
    if add_bos or add_eos:  # added by the post-processor, so the saved tokenizer.json does it too
        first = [named["bos_token"]] if add_bos else []
        last = [named["eos_token"]] if add_eos else []
        single = " ".join(first + ["$A"] + last)
        pair = " ".join([single] + [f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last])
        tk.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in dict.fromkeys(first + last)])

    # Without tokenizer.chat_template (Gemma 3 270M has none) runtime's Tokenizer picks a format from the vocabulary.
    config = {**named, "add_bos_token": add_bos, "add_eos_token": add_eos}
    return GGUFTokenizer(tk, config, meta.get("tokenizer.chat_template"))
