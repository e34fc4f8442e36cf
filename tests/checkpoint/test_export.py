"""Export: GGUF files read by llama.cpp (llama-cpp-python) with greedy tokens equal to slm's (f32)
and close logits (f16, q8_0); Hugging Face folders, also from quantized models, that transformers
loads unchanged. Under CI=true a missing llama_cpp fails the llama.cpp tests instead of skipping."""

from __future__ import annotations

import os

import pytest
import torch

import slm
from support.models import FAMILIES, hf_model, make_checkpoint
from slm.checkpoint.gguf_write import write_gguf
from support.llamacpp import llama_cpp

EXPORTED = ["llama-untied", "llama-tied", "mistral-gqa", "phi"]


def open_llama(path: str):
    """llama.cpp on `path` with its runtime weight repacking off: llama-cpp-python 0.3.36 crashes
    (SIGSEGV in decode) when it repacks the Q8_0 tensors of a model this small for the CPU. The
    repacking is llama.cpp's own layout at run time; the file and the numbers it computes from it
    are the same either way."""
    lib = llama_cpp()
    defaults = lib.llama_cpp.llama_model_default_params  # what Llama.__init__ starts from

    def no_repacking():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params
    lib.llama_cpp.llama_model_default_params = no_repacking
    try:
        return lib.Llama(path, n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    finally:
        lib.llama_cpp.llama_model_default_params = defaults


@pytest.fixture(scope="module", params=EXPORTED)
def model_dir(request, tmp_path_factory, tokenizer_dir):
    family, kw = FAMILIES[request.param]
    return make_checkpoint(str(tmp_path_factory.mktemp(request.param)), family, tokenizer_dir, **kw)


def llama_logits(path: str, ids: list[int]) -> torch.Tensor:
    llm = open_llama(path)
    llm.eval(ids)
    out = torch.tensor(llm.scores[:len(ids)])
    llm.close()
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("dtype,tol", [("f32", 2e-3), ("f16", 1e-2), ("q8_0", 6e-2)])
def test_gguf_round_trip_through_llama_cpp(model_dir, tmp_path, dtype, tol):
    lm = slm.load(model_dir)
    path = str(tmp_path / f"m-{dtype}.gguf")
    write_gguf(lm, path, dtype)
    prompt = "Once upon a time, there was"
    ids = lm.tokenizer.encode(prompt)
    llm = open_llama(path)
    assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids  # the embedded tokenizer
    assert llm.metadata.get("tokenizer.chat_template") == lm.tokenizer.chat_template
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() / ours.abs().max() < tol
    if dtype == "f32":  # greedy tokens identical to slm generate
        # llama.cpp runs Mistral v0.1 without its sliding window: compare within the window
        n = min(24, (lm.config.sliding_window or 10**6) - len(ids))
        llm.reset()
        theirs_tokens = []
        for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs_tokens.append(t)
            if len(theirs_tokens) == n:
                break
        from slm.runtime.generate import generate_ids
        ours_tokens = [s[0] for s in generate_ids(lm.model, [ids], n)]
        assert theirs_tokens == ours_tokens
    llm.close()
    back = slm.load(path)  # and slm reads its own file back
    with torch.no_grad():
        torch.testing.assert_close(back.model(torch.tensor([ids]))[0], ours, rtol=0, atol=tol * ours.abs().max().item() * 2)


def test_gguf_export_refuses_unsupported(tmp_path, tokenizer_dir):
    lm = slm.load(make_checkpoint(str(tmp_path / "g"), "gemma3", tokenizer_dir, num_key_value_heads=2))
    with pytest.raises(ValueError, match="Llama, Mistral and Phi"):
        write_gguf(lm, str(tmp_path / "g.gguf"))
    with pytest.raises(ValueError, match="dtype"):
        write_gguf(lm, str(tmp_path / "g.gguf"), "q4_0")


@pytest.mark.parametrize("family,quantize", [("phi", None), ("phi", "int4"), ("llama-untied", "int8"),
                                             ("llama-tied", "int8"), ("gemma3", "int4")])
def test_hf_export_loads_in_transformers(tmp_path, tokenizer_dir, family, quantize):
    """A quantized model exports dequantized, its embedding too (a tied head's table once, as the
    embedding): transformers computes the quantized model's logits."""
    src = make_checkpoint(str(tmp_path / "src"), FAMILIES[family][0], tokenizer_dir, **FAMILIES[family][1])
    lm = slm.load(src, quantize=quantize)
    from slm.cli import main
    if quantize:
        lm.save(str(tmp_path / "q"))
        src = str(tmp_path / "q")
    main(["export", "--model", src, "--format", "hf", "--out", str(tmp_path / "hf")])
    ref = hf_model(str(tmp_path / "hf"))
    ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, lm.model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,quantize", [("llama-tied", "int4"), ("phi", "int8")])
def test_gguf_export_of_quantized_model(tmp_path, tokenizer_dir, family, quantize):
    """An f32 GGUF of a quantized model holds its dequantized weights, embedding included: slm
    reads it back to the quantized model's logits."""
    src = make_checkpoint(str(tmp_path / "src"), FAMILIES[family][0], tokenizer_dir, **FAMILIES[family][1])
    lm = slm.load(src, quantize=quantize)
    write_gguf(lm, str(tmp_path / "m.gguf"), "f32")
    back = slm.load(str(tmp_path / "m.gguf"))
    ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids), lm.model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.llamacpp
def test_cli_export_gguf(tmp_path, tokenizer_dir):
    src = make_checkpoint(str(tmp_path / "src"), "llama", tokenizer_dir)
    from slm.cli import main
    q = str(tmp_path / "q8")
    main(["quantize", "--model", src, "--bits", "8", "--out", q])  # a quantized folder exports dequantized
    main(["export", "--model", q, "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0"])
    lm = slm.load(q)
    ids = lm.tokenizer.encode("The cat sat on the mat.")
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]))[0]
    theirs = llama_logits(str(tmp_path / "m.gguf"), ids)
    assert (theirs - ours).abs().max() / ours.abs().max() < 6e-2


@pytest.mark.llamacpp
@pytest.mark.smollm2
def test_gguf_export_keeps_the_tokenizer(smollm2_gguf, tmp_path):
    """GGUF -> GGUF: the source's tokenizer metadata is written unchanged (tokenizer.ggml.pre
    "smollm", not GPT-2's), so llama.cpp tokenizes a real text (the README) the same before and after."""
    from slm.checkpoint.gguf import read_gguf
    from slm.cli import main
    out = str(tmp_path / "s.gguf")
    main(["export", "--model", smollm2_gguf, "--format", "gguf", "--dtype", "q8_0", "--out", out])
    before, after = read_gguf(smollm2_gguf).metadata, read_gguf(out).metadata
    assert {k: v for k, v in after.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in before.items() if k.startswith("tokenizer.")}
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8") as f:
        text = f.read().encode()
    ids = [llama_cpp().Llama(p, vocab_only=True, verbose=False).tokenize(text, add_bos=True, special=True)
           for p in (smollm2_gguf, out)]
    assert ids[0] == ids[1]


@pytest.mark.llamacpp
@pytest.mark.smollm2
def test_gguf_export_of_a_folder_names_its_pre_tokenizer(smollm2_gguf, tmp_path):
    """A Hugging Face folder with SmolLM2's tokenizer (as slm saves it: digits alone, then GPT-2's
    split; clean_up_tokenization_spaces false) exports as tokenizer.ggml.pre "smollm", and llama.cpp
    tokenizes the README with it as with SmolLM2's own file."""
    from slm.checkpoint.gguf import read_gguf
    from slm.cli import main
    from slm.runtime.tokenizer import Tokenizer
    Tokenizer(*read_gguf(smollm2_gguf).tokenizer()).save(str(tmp_path / "tok"))
    src = make_checkpoint(str(tmp_path / "src"), "llama", str(tmp_path / "tok"))
    out = str(tmp_path / "m.gguf")
    main(["export", "--model", src, "--format", "gguf", "--out", out])
    assert read_gguf(out).metadata["tokenizer.ggml.pre"] == "smollm"
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8") as f:
        text = f.read().encode()
    ids = [llama_cpp().Llama(p, vocab_only=True, verbose=False).tokenize(text, add_bos=True, special=True)
           for p in (smollm2_gguf, out)]
    assert ids[0] == ids[1]
