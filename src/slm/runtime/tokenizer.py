"""One Tokenizer over the `tokenizers` library, read from and written to Hugging Face files
(tokenizer.json, tokenizer_config.json, chat_template.jinja), with chat templates rendered by
Jinja2 in a sandbox, as transformers does."""

from __future__ import annotations

import json
import math
import os
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import Tokenizer as _Tk
from tokenizers.decoders import DecodeStream

from ..checkpoint.safetensors_io import CheckpointError
from ..checkpoint.hf import read_json

# Used when a checkpoint brings no chat template: ChatML, as Orca 2 and many small models use.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's turn format, for Gemma tokenizers without a template (base models).
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{% if m['role'] == 'system' %}{{ '<start_of_turn>user\n' + m['content'] + '\n\n' }}{% else %}"
    "{% if not (loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system') %}{{ '<start_of_turn>' + role + '\n' }}"
    "{% endif %}{{ m['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# For a tokenizer without ChatML tokens: plain text turns.
PLAIN_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):  # older tokenizer_config.json stores AddedToken dicts
        tok = tok.get("content")
    return tok if isinstance(tok, str) and tok else None


def _template_str(template) -> str | None:
    """A chat_template value: a string, or (transformers' multi-template form) a list of
    {"name", "template"} of which "default" is the chat one."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"chat_template must be a string, got {type(template).__name__}")
    return template or None


class Tokenizer:
    def __init__(self, tk: _Tk, config: dict | None = None, chat_template: str | None = None):
        self.tk = tk
        self.config = dict(config or {})
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        self.chat_template = chat_template or _template_str(self.config.get("chat_template"))
        self.bos_id = tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = tk.token_to_id(self.eos_token) if self.eos_token else None
        # Some configs ask for a BOS that tokenizer.json's post-processor does not add itself.
        probe = tk.encode("a").ids
        self._prepend_bos = bool(self.config.get("add_bos_token") and self.bos_id is not None
                                 and (not probe or probe[0] != self.bos_id))

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise CheckpointError(f"{path}: no tokenizer.json (slm reads the fast-tokenizer format)")
        try:
            tk = _Tk.from_file(tj)
        except Exception as e:  # the Rust library raises plain Exceptions
            raise CheckpointError(f"{tj}: cannot be read as a tokenizer ({e})") from None
        config = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(tc):
            config = read_json(tc)
        template = None
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_file):
            try:
                with open(jinja_file, encoding="utf-8") as f:
                    template = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{jinja_file}: cannot be read as a UTF-8 chat template ({e})") from None
        return cls(tk, config, template)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tk.save(os.path.join(path, "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k not in ("chat_template", "added_tokens_decoder")}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for key in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, key):
                config[key] = getattr(self, key)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        if self.chat_template:
            with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)

    # -- text <-> ids --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)
        # encode_batch, not encode: the library's encode holds the GIL for its whole run (1.7 s on
        # 2 MB of text, during which a server's event loop stands still); encode_batch releases it.
        ids = self.tk.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True):
        """A function id -> new text (possibly ''), that holds back incomplete UTF-8 sequences."""
        ds = DecodeStream(skip_special_tokens=skip_special_tokens)
        return lambda i: ds.step(self.tk, int(i)) or ""

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    # -- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each chat message needs 'role' and 'content', got {m!r}")
        template = self.chat_template
        if template is None:
            template = (CHATML if self.token_id("<|im_start|>") is not None else
                        GEMMA_CHAT if self.token_id("<start_of_turn>") is not None else PLAIN_CHAT)
        for m in messages:
            if isinstance(m["content"], str):
                check_text(m["content"], "a chat message")
        try:
            return _compile(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **({"tools": tools} if tools else {}),
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", pad_token=self.pad_token or "")
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the model's chat template is unusable: syntax error at line {e.lineno}: {e.message}") from None
        except TemplateRefused as e:
            raise ValueError(f"the model's chat template refused the conversation: {e}") from None
        except (jinja2.TemplateError, ArithmeticError, MemoryError, RecursionError, TypeError, ValueError,
                AttributeError, LookupError) as e:
            # SecurityError (the sandbox refused an operation), runaway arithmetic, a template that
            # expects fields the messages lack: the template cannot render this conversation.
            raise ValueError(f"the model's chat template is unusable: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        # The template writes BOS itself where the model wants one; do not add a second.
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        ids = self.encode(text, add_special_tokens=False)
        if self.bos_id is not None and self.bos_token and not text.startswith(self.bos_token) and self._adds_bos():
            ids = [self.bos_id] + ids
        return ids

    def _adds_bos(self) -> bool:
        return self._prepend_bos or (self.bos_id is not None and self.tk.encode("a").ids[:1] == [self.bos_id])


class Detokenizer:
    """Incremental detokenization with stop strings, a token at a time (`generate.stream_text` and
    the server's engine): text that may still become a stop string, and incomplete UTF-8, are held
    back until the next tokens settle them."""

    def __init__(self, tokenizer, stop: list[str]):
        self.step, self.stop = tokenizer.decode_stream(), stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming
        self.text, self.sent = "", 0  # the text so far, and how much of it has been handed out

    def add(self, token: int) -> tuple[str, bool]:
        """-> (text safe to hand out, whether a stop string ended the text)"""
        self.text += self.step(token)
        cut = min((i for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            out, self.text = self.text[self.sent:cut], self.text[:cut]
            self.sent = len(self.text)
            return out, True
        safe = len(self.text) - self.hold
        if safe <= self.sent:
            return "", False
        out, self.sent = self.text[self.sent:safe], safe
        return out, False

    def flush(self) -> str:
        """The text held back, at the end of the sequence."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# Special tokens of tokenizers trained by slm: one document separator that also serves as BOS/EOS
# (as GPT-2's), padding, and ChatML turn markers for chat fine-tuning.
EOT, PAD = "<|endoftext|>", "<|pad|>"
SPECIALS = [EOT, PAD, "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: any byte sequence is encodable, nothing is ever unknown) trained
    with the `tokenizers` library on an iterator of strings. Encoding prepends EOT as BOS, so a
    prompt starts the way every training document does."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIALS)} (bytes + special tokens)")
    tk = _Tk(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B",
                                                      special_tokens=[(EOT, tk.token_to_id(EOT))])
    return Tokenizer(tk, {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD, "model_max_length": 1 << 30},
                     chat_template=CHATML)


def check_text(text, what: str = "the text") -> None:
    """Text for the tokenizer must be a str of valid Unicode: a lone surrogate (what Python makes of
    non-UTF-8 bytes in a command line or a JSON "\\udc80" escape) cannot be encoded."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text: {text[e.start]!r} at character {e.start} "
                         "(non-UTF-8 bytes, or a lone surrogate)") from None


class TemplateRefused(jinja2.exceptions.TemplateError):
    """The template's own raise_exception: it refuses the conversation (e.g. roles that do not
    alternate), rather than failing."""


# A template may build strings, lists and numbers only up to this size: `'a' * 10**10` or
# `9 ** 9 ** 9` in a hostile template would otherwise take all memory or time.
MAX_TEMPLATE_VALUE = 1 << 20
MAX_TEMPLATE_POWER_BITS = 4096


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(left) > 1 and \
                    right * math.log2(abs(left)) > MAX_TEMPLATE_POWER_BITS:
                raise SecurityError("a chat template may not compute numbers that large")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_VALUE:
                    raise SecurityError(f"a chat template may not build values longer than {MAX_TEMPLATE_VALUE:,}")
        return super().call_binop(context, operator, left, right)


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    if source not in _TEMPLATES:
        def raise_exception(msg):
            raise TemplateRefused(msg)
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
