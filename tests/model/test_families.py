"""A family is one record of the family table (slm.model.families). A made-up one, Llama with a GeGLU
MLP, registered here from one new record and nothing else, round-trips a tiny random model through
slm's Hugging Face writer and reader and through its GGUF writer and reader with identical logits.
docs/adding-a-family.md walks through this record."""

from __future__ import annotations

import json

import pytest
import torch

import slm
from slm.accel import accelerate
from slm.checkpoint.gguf import read_gguf
from slm.checkpoint.gguf_write import write_gguf
from slm.model import Transformer, families
from slm.model.config import ConfigError, ModelConfig
from slm.model.families import LLAMA_GGUF_NAMES, LLAMA_HF_NAMES, Family, carry, const
from slm.runtime.lm import LM
from slm.runtime.tokenizer import Tokenizer

GEGLU = Family(
    name="llama-geglu",
    title="Llama with GeGLU",
    # config.json: model_type, and the transformers class named in "architectures"
    hf_model_types=("llama_geglu",),
    hf_architecture="LlamaGegluForCausalLM",
    # tensor names: Llama's, in Hugging Face checkpoints and in GGUF files
    hf_names=LLAMA_HF_NAMES,
    gguf_names=LLAMA_GGUF_NAMES,
    # config.json's own entries, in this order: Llama's, but for the activation
    hf_fields=(carry("rms_norm_eps", "norm_eps", float), carry("head_dim", "head_dim"),
               carry("attention_bias", "attention_bias", bool), const("hidden_act", "gelu_pytorch_tanh"),
               carry("mlp_bias", "mlp_bias", bool)),
    # the one architecture switch that differs from Llama: the gate goes through GELU (tanh)
    switches={"mlp": "geglu"},
    # GGUF: an architecture name of its own, llama.cpp's Llama conventions
    gguf_arch="llama-geglu",
    gguf_permute_qk=True,
)


@pytest.fixture
def geglu():
    families.register(GEGLU)
    yield GEGLU
    families.unregister(GEGLU.name)
    assert families.get(GEGLU.name) is None


def tiny(tokenizer_dir: str) -> LM:
    cfg = ModelConfig(name="tiny-geglu", family="llama-geglu", vocab_size=400, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0.1)
    with torch.no_grad():  # norms start at 1: perturb them, so that reading them back is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    # as slm.load gives it back, accelerators swapped in: the round trips below compare exactly
    return LM(accelerate(model.eval()), Tokenizer.from_dir(tokenizer_dir))


IDS = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(lm: LM) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(IDS)


def test_the_record_sets_the_switches(geglu):
    cfg = ModelConfig(family="llama-geglu", vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    assert cfg.mlp == "geglu" and cfg.norm == "rmsnorm" and not cfg.parallel_block
    assert "llama-geglu" in families.FAMILIES and geglu.hf_act == "gelu_pytorch_tanh"
    hf = cfg.to_hf()
    assert (hf["model_type"], hf["architectures"], hf["hidden_act"]) == ("llama_geglu", ["LlamaGegluForCausalLM"],
                                                                         "gelu_pytorch_tanh")
    assert ModelConfig.from_hf(hf, name=cfg.name) == cfg
    with pytest.raises(ConfigError, match="hidden_act='silu' is not supported"):
        ModelConfig.from_hf({**hf, "hidden_act": "silu"})


def test_unregistered_is_unknown(geglu):
    families.unregister(geglu.name)
    try:
        with pytest.raises(ConfigError, match="unknown model family 'llama-geglu'"):
            ModelConfig(family="llama-geglu")
    finally:
        families.register(geglu)


def test_hf_round_trip(geglu, tokenizer_dir, tmp_path):
    lm = tiny(tokenizer_dir)
    lm.save(str(tmp_path / "hf"))
    hf = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf["model_type"] == "llama_geglu" and hf["hidden_act"] == "gelu_pytorch_tanh"
    back = slm.load(str(tmp_path / "hf"))
    assert back.config.family == "llama-geglu" and back.config.to_hf() == lm.config.to_hf()
    assert torch.equal(logits(back), logits(lm))
    # the switch is what makes it a family of its own: the same weights as Llama compute otherwise
    llama = Transformer(lm.config.replace(family="llama", mlp="swiglu"))
    llama.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(llama.eval()(IDS), logits(lm), atol=1e-3)


def test_gguf_round_trip(geglu, tokenizer_dir, tmp_path):
    lm = tiny(tokenizer_dir)
    path = str(tmp_path / "m.gguf")
    write_gguf(lm, path, "f32")
    ckpt = read_gguf(path)
    assert ckpt.architecture == "llama-geglu" and ckpt.family is geglu
    back = slm.load(path)
    assert back.config.family == "llama-geglu" and back.config.to_hf() == lm.config.to_hf()
    assert torch.equal(logits(back), logits(lm))
    text = "Once upon a time, there was a little girl."
    assert back.tokenizer.encode(text) == lm.tokenizer.encode(text)
