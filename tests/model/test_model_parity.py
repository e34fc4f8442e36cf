"""Logits and greedy tokens against transformers on tiny random checkpoints of every family."""

import torch

import slm
from support.models import hf_model, make_checkpoint


def test_logits_match_transformers(checkpoint):
    lm, ref = slm.load(checkpoint), hf_model(checkpoint)
    ids = torch.randint(0, lm.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = lm.model(ids), ref(ids).logits
    assert ours.shape == theirs.shape == (2, 48, lm.config.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_sliding_window_matters(tmp_path, tokenizer_dir):
    """The Mistral parity above only proves the window if the window changes the result."""
    path = make_checkpoint(str(tmp_path / "m"), "mistral", tokenizer_dir, num_key_value_heads=2, sliding_window=8)
    lm = slm.load(path)
    ids = torch.randint(0, 400, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        windowed = lm.model(ids)
        lm.model.config.sliding_window = None
        full = lm.model(ids)
    assert (windowed[:, :8] - full[:, :8]).abs().max() < 1e-5  # inside the window: identical
    assert (windowed[:, 20:] - full[:, 20:]).abs().max() > 1e-3
    with torch.no_grad():
        assert (windowed - hf_model(path)(ids).logits).abs().max() < 1e-4


def test_partial_rotary_is_partial(checkpoint):
    cfg = slm.load(checkpoint).config
    if cfg.family == "phi":
        assert cfg.rotary_dim == 6 and cfg.head_dim == 16  # int(16 * 0.4)


def test_greedy_tokens_match_transformers_generate(checkpoint):
    lm, ref = slm.load(checkpoint), hf_model(checkpoint)
    prompt = lm.tokenizer.encode("Once upon a time, there was a little")
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    from slm.runtime.generate import generate_ids
    ours = [step[0] for step in generate_ids(lm.model, [prompt], 32)]
    assert len(theirs) == 32
    assert ours == theirs


def test_save_then_transformers_loads_same_logits(checkpoint, tmp_path):
    lm = slm.load(checkpoint)
    out = str(tmp_path / "saved")
    lm.save(out)
    ref = hf_model(out)
    ids = torch.randint(0, lm.config.vocab_size, (1, 30))
    with torch.no_grad():
        assert (lm.model(ids) - ref(ids).logits).abs().max().item() < 1e-4
    again = slm.load(out)
    for (n, a), (_, b) in zip(lm.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    text = "Tom counted three apples."
    assert tok(text)["input_ids"] == again.tokenizer.encode(text)
