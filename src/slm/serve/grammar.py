"""Constrained decoding: output that always parses, by masking the tokens a grammar does not allow.

`response_format` ({"type": "json_object"}, or {"type": "json_schema", "json_schema": {"schema":
...}}) and llama.cpp's `grammar` (GBNF) become one grammar for llguidance, the token-level grammar
engine that vLLM and SGLang use: a Rust library whose matcher tells, for each decode step, which
tokens may come next (a bitmask over the vocabulary, ~0.05-0.5 ms a step for SmolLM2's 49,152
tokens), and advances with the token sampled. Each constrained sequence has its own matcher, so a
batch mixes constrained and free rows. A sequence whose grammar is complete stops there.

llguidance is an optional dependency (`pip install 'slm[serve]'` brings it); without it a request
that asks for a format gets a 400 saying so.
"""

from __future__ import annotations

import threading

import torch

# JSON as OpenAI's structured outputs write it: no whitespace between tokens to wander in (a small
# model given the freedom can fill its max_tokens with spaces and newlines).
JSON_DEFAULTS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A grammar or schema the engine cannot use: the message says why (an API 400)."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise GrammarError(f"constrained decoding needs llguidance ({e}): pip install 'slm[serve]'") from None
    return llguidance


def grammar_for(response_format: dict | None = None, grammar: str | None = None) -> str | None:
    """The llguidance grammar for a request's response_format and/or GBNF grammar, None for free
    text. Raises GrammarError for a format it does not know or both at once."""
    kind = (response_format or {}).get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise GrammarError(f"response_format: unknown type {kind!r} (text, json_object or json_schema)")
    if grammar is not None and kind != "text":
        raise GrammarError("response_format and grammar: give one of them")
    ll = _llguidance() if grammar is not None or kind != "text" else None
    if grammar is not None:
        from llguidance.gbnf_to_lark import gbnf_to_lark
        return lark_grammar(lambda: gbnf_to_lark(grammar), "grammar: not a GBNF grammar slm can use")
    if kind == "json_object":
        return ll.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format.json_schema: an object with the JSON schema under 'schema'")
        return ll.LLMatcher.grammar_from_json_schema(spec.get("schema", {}), defaults=JSON_DEFAULTS)
    return None


def lark_grammar(lark, what: str) -> str:
    """The llguidance grammar of a Lark grammar (lark(): its text, which may fail to build too);
    GrammarError starting with `what` where either cannot be used."""
    ll = _llguidance()
    try:
        return ll.LLMatcher.grammar_from_lark(lark())
    except Exception as e:  # noqa: BLE001 - the converter's and the library's own errors, whatever their class
        raise GrammarError(f"{what}: {e}") from None


class Constraints:
    """A model's tokenizer as llguidance reads it (built once, ~0.2 s, on first use) and the
    matchers of the sequences that follow a grammar."""

    def __init__(self, tokenizer, vocab: int, eos_ids: set[int]):
        self._json, self.vocab, self._eos = tokenizer.tk.to_str(), vocab, sorted(eos_ids)
        self._tokenizer = None
        self._lock = threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                ll = _llguidance()
                self._tokenizer = ll.LLTokenizer(self._json, n_vocab=self.vocab,
                                                 eos_token=self._eos[0] if len(self._eos) == 1 else self._eos or None)
            return self._tokenizer

    def check(self, grammar: str) -> None:
        """Raise GrammarError naming what is wrong with the grammar (for this vocabulary)."""
        error = _llguidance().LLMatcher.validate_grammar(grammar, self.tokenizer())
        if error:
            raise GrammarError(f"the requested format cannot be used: {error.strip()}")

    def matcher(self, grammar: str):
        m = _llguidance().LLMatcher(self.tokenizer(), grammar)
        if m.is_error():
            raise GrammarError(f"the requested format cannot be used: {m.get_error()}")
        return m

    def allowed(self, matchers: list) -> torch.Tensor:
        """bool [len(matchers), vocab]: the tokens each matcher allows next."""
        # bit j of word w: token 32 w + j (what llguidance.torch.fill_next_token_bitmask writes;
        # importing that module takes ~1.7 s, for the two lines it would run here)
        bits = torch.full((len(matchers), (self.vocab + 31) // 32), -1, dtype=torch.int32)
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bits[i].data_ptr(), bits.shape[1] * 4)
        shifts = torch.arange(32, dtype=torch.int32)
        return ((bits[:, :, None] >> shifts) & 1).bool().view(len(matchers), -1)[:, :self.vocab]
