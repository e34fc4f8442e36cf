"""`LM`: a model with its tokenizer, the object `slm.load` returns."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import torch

from ..accel import accelerate
from ..checkpoint import gguf, hf
from ..model import Transformer
from ..model.config import ModelConfig
from ..quant.apply import FILE, StreamingQuantizer
from .models import DEFAULT_BASE_MODEL, KNOWN, resolve
from .generate import Sampling, generate_ids, stream_text
from .tokenizer import Tokenizer


class LM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, generation_config: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.generation_config = dict(generation_config or {})

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def eos_ids(self) -> set[int]:
        ids = set()
        for src in (self.generation_config.get("eos_token_id"), self.config.eos_token_id):
            ids.update(src if isinstance(src, list) else [src] if src is not None else [])
        if self.tokenizer is not None:
            # End-of-turn markers end a chat reply; base models rarely emit them otherwise.
            for tok in (self.tokenizer.eos_token, "<end_of_turn>", "<|im_end|>"):
                if tok and self.tokenizer.token_id(tok) is not None:
                    ids.add(self.tokenizer.token_id(tok))
        return ids

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids or load a folder with tokenizer.json")
        return self.tokenizer

    # -- generation ----------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, **sampling) -> Iterator[str]:
        """Yield the continuation of one prompt as text, chunk by chunk."""
        check_max_new_tokens(max_new_tokens)
        s = Sampling(**sampling)
        ids = self._need_tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
        steps = (row[0] for row in generate_ids(self.model, [ids], max_new_tokens, s, self.eos_ids))
        yield from stream_text(self.tokenizer, steps, s.stop, self.eos_ids)

    def generate(self, prompt: str | list[str], max_new_tokens: int = 128, **sampling) -> str | list[str]:
        """Continue one prompt (returns str) or a batch of prompts decoded together (returns list)."""
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, max_new_tokens, **sampling))
        check_max_new_tokens(max_new_tokens)
        s = Sampling(**sampling)
        tok = self._need_tokenizer()
        prompts = [tok.encode(p) for p in prompt]
        rows: list[list[int | None]] = [[] for _ in prompts]
        for step in generate_ids(self.model, prompts, max_new_tokens, s, self.eos_ids):
            for r, t in zip(rows, step):
                r.append(t)
        return ["".join(stream_text(tok, iter(r), s.stop, self.eos_ids)) for r in rows]

    def chat(self, messages: list[dict], max_new_tokens: int = 256, stream: bool = False, **sampling):
        """Reply to a conversation formatted with the checkpoint's chat template."""
        ids = self._need_tokenizer().encode_chat(messages)
        chunks = self.stream(ids, max_new_tokens, **sampling)
        return chunks if stream else "".join(chunks)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str, **kw) -> None:
        hf.save_model(self.model, path, tokenizer=self.tokenizer, generation_config=self.generation_config, **kw)


def check_max_new_tokens(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {n!r}")


def check_device(device: str | torch.device | None) -> torch.device | None:
    """The device a model is asked to run on, checked before anything is loaded: a name torch
    knows, and hardware this machine has."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (PyTorch {torch.__version__}, "
                             f"{'built without CUDA' if torch.version.cuda is None else 'no GPU found'}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: Apple's MPS is not available here; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: slm runs on cpu, cuda or mps")
    return d


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")
    return dtype


DEFAULT_MODEL = DEFAULT_BASE_MODEL  # what load() uses when given no model


def default_model_path() -> str:
    """The default base model's file (gemma-3-270m, a Q4_K_M GGUF): see runtime/models.py."""
    return KNOWN[DEFAULT_MODEL].path()


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


QUANTIZE = ("int8", "int4", "none")  # slm.load's quantize (and --quantize) choices


def load(path: str | None = None, dtype: torch.dtype | str | None = None,
         device: str | torch.device | None = None, quantize: str | None = None,
         group_size: int | None = None, file_blocks: bool = True, tokenizer: str | None = None) -> LM:
    """Load a Hugging Face model folder (config.json + safetensors + tokenizer.json) or a GGUF file.
    With no path, the default base model (gemma-3-270m) is used; a known name (`slm models`) is its
    installed file. Either way a line on stderr names the model and the precision it runs in.
    quantize="int8" (one scale per output channel) or "int4" (group_size weights per scale, default
    32) quantizes the linear layers while they load, one at a time. A folder saved by
    `slm quantize` loads quantized as it was saved.

    A GGUF file loads by default as llama.cpp runs it: the tensors it stores as Q4_0, Q4_1, Q5_0,
    Q5_1, Q8_0, Q4_K, Q5_K or Q6_K stay in those blocks, byte for byte (quant.gguf_layers), and the
    others (F32, F16, other block types) in fp32. An explicit dtype, quantize="none", a device other
    than the CPU or file_blocks=False load the file's weights dequantized instead.
    With quantize="int8"|"int4" the file's blocks are kept as well, whichever the mode (int4 does
    not round its 5-, 6- and 8-bit tensors down to 4 bits; int8 does not round its 4-bit ones
    again); only its other tensors become int8 or int4. file_blocks=False requantizes every tensor
    from fp32 to the mode instead (what a folder saved with `slm quantize` holds).
    tokenizer: a folder with a tokenizer.json, used instead of the model's own tokenizer (for a GGUF
    file whose tokenizer slm cannot rebuild, e.g. an unknown tokenizer.ggml.pre).

    The options are checked here, once, before any file is opened: the dtype name, and the
    quantization mode and group size by the one quantizer made for the loader."""
    dtype_given = dtype is not None
    dtype = check_dtype(dtype)
    dev = check_device(device)
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization mode {quantize!r}; supported: {', '.join(QUANTIZE)}")
    if quantize == "none" and group_size is not None:
        raise ValueError("group_size applies to quantize='int8' or 'int4', not 'none'")
    quantizer = StreamingQuantizer(None, quantize, group_size, file_blocks=file_blocks) \
        if quantize not in (None, "none") else None
    # a GGUF file's own blocks by default, where the kernels run them (CPU, fp32 elsewhere)
    blocks = quantize is None and file_blocks and not dtype_given and (dev is None or dev.type == "cpu")
    lm = _load(path, dtype, device, quantizer, blocks, tokenizer)
    accelerate(lm.model)
    return lm


def _load(path, dtype: torch.dtype | None, device, quantizer: StreamingQuantizer | None,
          file_blocks: bool = False, tokenizer=None) -> LM:
    """file_blocks: with no quantizer, a GGUF file's blocks kept (StreamingQuantizer FILE).
    tokenizer: a folder whose tokenizer.json is used instead of the checkpoint's."""
    tok = None if tokenizer is None else Tokenizer.from_dir(os.fspath(tokenizer))  # read first: fails fast
    given = path
    path, known = resolve(None if path is None else os.fspath(path))
    if os.path.isfile(path):
        ckpt = gguf.read_gguf(path)
        tok = tok or Tokenizer(*ckpt.tokenizer())  # before the weights: an unknown pre-tokenizer fails fast
        if quantizer is None and file_blocks:
            quantizer = StreamingQuantizer(None, FILE)
        model = gguf.load_model(ckpt, dtype, device, quantizer)
        lm = LM(model, tok, ckpt.generation_config)
        dequantized = ckpt.block_types(quantizer.kept if quantizer is not None else None)
    else:
        model = hf.load_model(path, dtype, device, quantizer)
        tokenizer = tok or (Tokenizer.from_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None)
        gen_path = os.path.join(path, "generation_config.json")
        gen = hf.read_json(gen_path) if os.path.exists(gen_path) else {}
        lm, dequantized = LM(model, tokenizer, gen), {}
    if known is not None:
        name = (f"{'no model given, using the default ' if given is None else ''}{known.name} "
                f"({known.title}, {known.kind}, {known.file}, {known.licence}) from {path}")
    else:
        name = os.path.basename(os.path.normpath(path))
    print(f"slm: {name}: {precision(lm.model, quantizer, dequantized)}", file=sys.stderr)
    return lm


def precision(model: Transformer, quantizer: StreamingQuantizer | None, dequantized: dict[str, int]) -> str:
    """What the stderr line of a load says of the weights: the file's blocks kept, slm's int8/int4,
    the floating-point dtype, and the block formats dequantized to it (dequantized: name -> tensors)."""
    if quantizer is not None:
        text = quantizer.describe()
    else:
        text = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model.dtype, str(model.dtype))
        q = getattr(model, "quantization", None)
        if q:
            g = q.get("group_size")
            text = f"int{q.get('bits')} ({'per channel' if g is None else f'groups of {g}'}, as saved); {text} elsewhere"
    if dequantized:
        text += " (dequantized from the file's " + ", ".join(f"{n} x {c}" for n, c in dequantized.items()) + ")"
    return text
