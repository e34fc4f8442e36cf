"""`LM`: a model with its tokenizer, the object `slm.load` returns."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from .checkpoint import hf
from .config import ModelConfig
from .generate import Sampling, generate_ids, stream_text
from .model import Transformer
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
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return ids

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids or load a folder with tokenizer.json")
        return self.tokenizer

    # -- generation ----------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, **sampling) -> Iterator[str]:
        """Yield the continuation of one prompt as text, chunk by chunk."""
        s = Sampling(**sampling)
        ids = self._need_tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
        steps = (row[0] for row in generate_ids(self.model, [ids], max_new_tokens, s, self.eos_ids))
        yield from stream_text(self.tokenizer, steps, s.stop, self.eos_ids)

    def generate(self, prompt: str | list[str], max_new_tokens: int = 128, **sampling) -> str | list[str]:
        """Continue one prompt (returns str) or a batch of prompts decoded together (returns list)."""
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, max_new_tokens, **sampling))
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


def load(path: str, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None) -> LM:
    """Load a Hugging Face model folder (config.json + safetensors + tokenizer.json)."""
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    path = os.fspath(path)
    if os.path.isfile(path):
        raise hf.CheckpointError(f"{path}: expected a model folder (GGUF files are not supported yet)")
    model = hf.load_model(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    gen_path = os.path.join(path, "generation_config.json")
    gen = hf.read_json(gen_path) if os.path.exists(gen_path) else {}
    return LM(model, tokenizer, gen)
