"""A GGUF file's tokenizer (tokenizer.ggml.* metadata) rebuilt as a `tokenizers.Tokenizer`.

llama.cpp stores a vocabulary, its token types and either BPE merges (byte-level vocabularies,
`gpt2`) or scores (SentencePiece vocabularies, `llama`), the special tokens' ids and a chat
template. `build_tokenizer` returns what it reads, a `GGUFTokenizer`: the `tokenizers.Tokenizer`,
the tokenizer_config.json-style settings (special tokens, add_bos_token) and the chat template;
`slm.runtime.tokenizer.Tokenizer(*parts)` makes slm's tokenizer of it. A byte-level vocabulary is
split before BPE as llama.cpp splits it for the file's tokenizer.ggml.pre: one table,
`PRE_TOKENIZERS`, holds each value's regexes and flags.
"""

from __future__ import annotations

from typing import NamedTuple

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Tk

from .safetensors_io import CheckpointError


class GGUFTokenizer(NamedTuple):
    tk: Tk
    config: dict  # bos_token, eos_token, unk_token, pad_token, add_bos_token, add_eos_token, clean_up_tokenization_spaces
    chat_template: str | None


_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


class Pre(NamedTuple):
    """How llama.cpp pre-tokenizes a byte-level BPE vocabulary of one tokenizer.ggml.pre value."""
    splits: tuple[str, ...]      # llama.cpp's regex_exprs: each regex cuts every piece in turn, matches and gaps kept
    ignore_merges: bool = False  # a piece that is a whole token is that token, whatever the merges would make
    add_bos: bool = False        # llama.cpp's add_bos for a file without tokenizer.ggml.add_bos_token
    clean_spaces: bool = True    # llama.cpp's clean_spaces (" ." -> "." in detokenize): transformers'
    #                              clean_up_tokenization_spaces, kept in the tokenizer's settings


# The regexes as llama.cpp runs them. It matches \p{..} on a copy of the text with every non-ASCII
# character replaced by its category and every non-ASCII space by \v, so a literal class never
# contains a non-ASCII space (U+3000 is left out of DeepSeek's classes below for that reason), and
# GPT-2's regex is run by a hand-written splitter that ends in `|\s+` although the regex it stands for does not.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
# Tekken's and GPT-4o's upper/lower-case letter classes, as llama.cpp writes them: "a letter not a-z", "a letter not A-Z"
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          rf"{_CONTRACTIONS}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek's CJK (and U+0800..) and Hangul runs; "&&\S", a class intersection, leaves out the spaces (see above)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff&&\\S]+"
_DEEPSEEK_PUNCTUATION = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+"  # ASCII, full-width, quotes
_DEEPSEEK_LETTERS = (  # DeepSeek LLM's explicit list of cased letters, from its tokenizer.json
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    "\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+")
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"  # words up to spaces and punctuation


_DEFAULT = Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))


def _family(names: str, pre: Pre) -> dict[str, Pre]:
    return dict.fromkeys(names.split(), pre)


# tokenizer.ggml.pre -> Pre, for byte-level BPE vocabularies (tokenizer.ggml.model "gpt2"): every value
# llama.cpp (as vendored by llama-cpp-python 0.3.36) maps to one of these splits, with its flags.
# The first name of a family is the one `slm export` writes for a Hugging Face tokenizer of its split.
PRE_TOKENIZERS: dict[str | None, Pre] = {
    # No value, or "default": llama.cpp's fallback (punctuation runs, GPT-2, numbers, then 3-digit groups).
    None: _DEFAULT,
    "default": _DEFAULT,
    # GPT-2's split: Phi-2, MPT, OLMo, Jais, Mellum, GigaChat, A.X 4.0, EXAONE 4.
    **_family("gpt-2 phi-2 mpt olmo jais mellum gigachat a.x-4.0 exaone4", Pre((_GPT2,))),
    **_family("trillion granite-docling", Pre((_GPT2,), clean_spaces=False)),
    # Every digit alone, then GPT-2's: SmolLM, StarCoder, Refact, CodeShell, EXAONE, Minerva, Command-R.
    **_family("starcoder refact codeshell exaone minerva-7b mellum2", Pre((r"\p{N}", _GPT2))),
    **_family("smollm command-r", Pre((r"\p{N}", _GPT2), clean_spaces=False)),
    # Llama 3's split (numbers in threes); a word that is a token stays whole, and BOS is added:
    # Llama 3, Falcon 3, Pixtral, Mi:dm 2.0, LFM2, Falcon-H1.
    **_family("llama-bpe llama3 llama-v3 falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
              Pre((_LLAMA3,), ignore_merges=True, add_bos=True)),
    **_family("smaug-bpe dbrx", Pre((_LLAMA3,))),  # the same split with plain merges: Smaug-Llama-3, DBRX
    # Mistral's Tekken (Mistral NeMo and the Mistral models after it): upper/lower-case words, digits alone.
    **_family("tekken", Pre((_TEKKEN,), ignore_merges=True, add_bos=True, clean_spaces=False)),
    # DeepSeek LLM and DeepSeek Coder: newlines, letter runs, punctuation runs, CJK runs, numbers.
    **_family("deepseek-llm", Pre(("[\r\n]", _DEEPSEEK_LETTERS, _DEEPSEEK_PUNCTUATION, r"\s+$", _CJK, r"\p{N}+"),
                                  clean_spaces=False)),
    **_family("deepseek-coder", Pre(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"), clean_spaces=False)),
    # Qwen2's split (Llama 3's with digits alone): Qwen2, DeepSeek-R1-Distill-Qwen, Hunyuan, Megrez, StableLM 2.
    **_family("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", Pre((_QWEN2,), clean_spaces=False)),
    **_family("megrez stablelm2", Pre((_QWEN2,))),
    **_family("seed-coder", Pre((_SEED_CODER,), clean_spaces=False)),  # Seed-Coder: Qwen2's, newlines apart
    # GPT-4o's (o200k) split: Llama 4, Kanana 2, MiniMax-M2.
    **_family("gpt-4o llama4 kanana2 minimax-m2", Pre((_GPT4O,), clean_spaces=False)),
    # Falcon: punctuation runs, GPT-2's, then 3-digit groups.
    **_family("falcon", Pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"))),
    # BLOOM, Poro and GPT-3-Finnish: words up to spaces and punctuation; Viking: and digits alone.
    **_family("bloom gpt3-finnish", Pre((_PORO,))),
    **_family("poro-chat", Pre((_PORO,), clean_spaces=False)),
    **_family("viking", Pre((_PORO, r"\p{N}"), clean_spaces=False)),
}


def unknown_pre_error(path: str, pre) -> CheckpointError:
    return CheckpointError(
        f"{path}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); pass --tokenizer DIR (slm.load(..., "
        "tokenizer=DIR)), a folder with the model's tokenizer.json, to use that tokenizer instead")


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
        default_bos, clean_spaces = True, False  # llama.cpp's for SentencePiece vocabularies
    else:
        pre = meta.get("tokenizer.ggml.pre")
        if pre not in PRE_TOKENIZERS:
            raise unknown_pre_error(path, pre)
        rule = PRE_TOKENIZERS[pre]
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # Added tokens outside the byte alphabet (runs of real spaces) are respelled as their bytes.
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tk = Tk(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=rule.ignore_merges))
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rule.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        default_bos, clean_spaces = rule.add_bos, rule.clean_spaces

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
    config = {**named, "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": clean_spaces}
    return GGUFTokenizer(tk, config, meta.get("tokenizer.chat_template"))
