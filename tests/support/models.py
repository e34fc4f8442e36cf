"""Tiny but real checkpoints for the tests: transformers' own config and model classes, saved as
sharded safetensors folders with a trained BPE tokenizer; and the headless browser some tests drive."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

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


def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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
