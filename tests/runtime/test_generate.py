"""Sampling, stop strings, streaming, chat formatting, and the CLI."""

import subprocess
import sys

import pytest
import torch

import slm
from slm.runtime.generate import Sampling, apply_repetition_penalty, sample, stream_text


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tokenizer_dir):
    from support.models import make_checkpoint
    return slm.load(make_checkpoint(str(tmp_path_factory.mktemp("gen")), "llama", tokenizer_dir))


def test_seeded_sampling_is_reproducible(lm):
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a, b = lm.generate("Once upon a time", **kw), lm.generate("Once upon a time", **kw)
    assert a == b
    assert lm.generate("Once upon a time", **{**kw, "seed": 8}) != a


def test_top_k_one_is_greedy(lm):
    greedy = lm.generate("The cat", max_new_tokens=15, temperature=0)
    assert lm.generate("The cat", max_new_tokens=15, temperature=1.3, top_k=1, seed=1) == greedy


def test_top_p_keeps_smallest_set():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])  # probs ~ .665 .245 .090 .0002
    s = Sampling(temperature=1.0, top_p=0.8)
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, s, g).item() for _ in range(300)}
    assert picks == {0, 1}


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits = torch.randn(2, 50)
    seen = torch.tensor([[1, 5, 5, 9], [0, 2, 3, 4]])
    ours = apply_repetition_penalty(logits, seen, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    assert torch.allclose(ours, theirs)


def test_sampling_rejects_bad_values():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_stop_strings_cut_text_in_stream(lm):
    full = lm.generate("Once upon a time", max_new_tokens=30, temperature=0)
    assert len(full) > 10
    k = next(k for k in range(5, len(full) - 3) if full.index(full[k:k + 3]) == k)  # first occurrence
    chunks = list(lm.stream("Once upon a time", max_new_tokens=30, temperature=0, stop=[full[k:k + 3], "zzzz"]))
    assert "".join(chunks) == full[:k]


class FakeTok:
    """Decodes token i to the i-th letter, to test stop handling independent of BPE."""
    def decode_stream(self):
        return lambda i: "abcdefghij"[i]


def test_stream_text_holds_back_partial_stop():
    out = list(stream_text(FakeTok(), iter([0, 1, 2, 3, 4, 5]), stop=["cde"], eos_ids=set()))
    assert "".join(out) == "ab"
    out = list(stream_text(FakeTok(), iter([0, 1, 2, 9, 4]), stop=["cde"], eos_ids=set()))
    assert "".join(out) == "abcje"
    out = list(stream_text(FakeTok(), iter([0, 1, 7, 2]), stop=[], eos_ids={7}))
    assert "".join(out) == "ab"


def test_streaming_equals_generate_and_batch(lm):
    prompts = ["Once upon a time", "Tom counted three apples and", "The"]
    batch = lm.generate(prompts, max_new_tokens=12, temperature=0)
    for p, b in zip(prompts, batch):
        assert "".join(lm.stream(p, max_new_tokens=12, temperature=0)) == b == lm.generate(p, max_new_tokens=12)


def test_eos_stops_generation(lm):
    eos = lm.tokenizer.eos_id
    lm.model.lm_head.bias = torch.nn.Parameter(torch.zeros(lm.config.vocab_size))
    try:
        with torch.no_grad():
            lm.model.lm_head.bias[eos] = 1e4  # EOS becomes the only choice
        assert lm.generate("Once", max_new_tokens=10) == ""
    finally:
        lm.model.lm_head.bias = None


def test_chat_template_matches_transformers(lm, tokenizer_dir):
    from transformers import AutoTokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]
    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert lm.tokenizer.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False,
                                                                             add_generation_prompt=True)
    ids = lm.tokenizer.encode_chat(msgs)
    theirs = ref.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert ids == list(theirs)
    assert isinstance(lm.chat(msgs, max_new_tokens=5, temperature=0), str)


def test_prompt_longer_than_context_is_refused(lm):
    with pytest.raises(ValueError, match="leaves no room in the context of 256"):
        lm.generate("apple " * 400, max_new_tokens=5)


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "slm", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_cli_generate_prints_only_the_continuation(lm, tmp_path):
    path = str(tmp_path / "m")
    lm.save(path)
    r = run_cli("generate", "--model", path, "--prompt", "Once upon a time", "--max-new-tokens", "16",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == lm.generate("Once upon a time", max_new_tokens=16, temperature=0) + "\n"


def test_cli_chat_session(lm, tmp_path):
    path = str(tmp_path / "m")
    lm.save(path)
    r = run_cli("chat", "--model", path, "--max-new-tokens", "8", "--temperature", "0", stdin="Hello\nHow are you?\n")
    assert r.returncode == 0, r.stderr
    msgs = [{"role": "user", "content": "Hello"}]
    first = lm.chat(msgs, max_new_tokens=8, temperature=0)
    assert r.stdout.startswith(first + "\n")
    assert len(r.stdout.splitlines()) == 2


def test_cli_error_is_one_clear_line(tmp_path):
    r = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert r.returncode == 1
    assert r.stderr.strip() == f"slm generate: error: {tmp_path / 'missing'}: no such model folder"
    assert "Traceback" not in r.stderr


def test_cli_info(tmp_path, lm):
    r = run_cli("info", "--preset", "mistral-7b-v0.1")
    assert r.returncode == 0
    assert "7,241,732,096" in r.stdout and "sliding window" in r.stdout and "weights int4" in r.stdout
    path = str(tmp_path / "m")
    lm.save(path)
    r = run_cli("info", "--model", path)
    assert r.returncode == 0 and f"{lm.config.num_params():,}" in r.stdout


def test_text_that_is_not_utf8_is_refused(lm):
    """A lone surrogate is what Python makes of non-UTF-8 bytes on a command line (and of a JSON
    "\\udc80" escape); the Rust tokenizer cannot take it."""
    for bad in ("\udcff", "caf\udce9", "a\ud800b"):
        with pytest.raises(ValueError, match="not valid UTF-8 text"):
            lm.generate(bad, max_new_tokens=2)
        with pytest.raises(ValueError, match="a chat message is not valid UTF-8"):
            lm.chat([{"role": "user", "content": bad}], max_new_tokens=2)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_max_new_tokens_must_be_positive(lm, n):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        lm.generate("Once", max_new_tokens=n)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        lm.generate(["Once", "Twice"], max_new_tokens=n)


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "presence_penalty"])
def test_nan_sampling_values_are_refused(field):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        Sampling(**{field: float("nan")})


TEMPLATES = {  # a hostile or broken chat template -> what the one error line says
    "{% for %}": "chat template is unusable: syntax error at line 1",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}": "chat template is unusable: SecurityError",
    "{{ cycler.__init__.__globals__ }}": "chat template is unusable: SecurityError",
    "{{ 'x' * 10**10 }}": "chat template is unusable: SecurityError: a chat template may not build values",
    "{{ [0] * 10**9 }}": "chat template is unusable: SecurityError",
    "{{ 9 ** 9 ** 9 ** 9 ** 9 }}": "chat template is unusable: SecurityError: a chat template may not compute",
    "{% for i in range(10**9) %}{% endfor %}": "chat template is unusable: OverflowError",
    "{{ messages[7].content }}": "chat template is unusable: UndefinedError",
    "{{ 1 / 0 }}": "chat template is unusable: ZeroDivisionError",
    "{{ raise_exception('Conversation roles must alternate') }}":
        "chat template refused the conversation: Conversation roles must alternate",
}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_chat_templates_that_fail_say_why(lm, template):
    tok = lm.tokenizer
    saved = tok.chat_template
    tok.chat_template = template
    try:
        with pytest.raises(ValueError) as e:
            lm.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    finally:
        tok.chat_template = saved
    assert TEMPLATES[template] in str(e.value), str(e.value)


def test_cli_refuses_bad_inputs_before_loading(tmp_path):
    """None of these loads a model (the path does not exist): each is refused first, in one line."""
    missing = str(tmp_path / "missing")
    cases = {
        ("--prompt", "caf\udce9"): "--prompt is not valid UTF-8 text",
        ("--temperature", "nan"): "argument --temperature: invalid finite number value: 'nan'",
        ("--max-new-tokens", "0"): "argument --max-new-tokens: must be at least 1, got 0",
        ("--max-new-tokens", "-1"): "argument --max-new-tokens: must be at least 1, got -1",
        ("--dtype", "float99"): "argument --dtype: invalid choice: 'float99'",
        ("--device", "banana"): "unknown device 'banana'",
        ("--top-p", "1.5"): "top_p must be in (0, 1]",
    }
    if not torch.cuda.is_available():
        cases[("--device", "cuda")] = "device 'cuda': no CUDA GPU is available here"
    for (flag, value), message in cases.items():
        argv = ["generate", "--model", missing, "--prompt", "hi", flag, value]
        r = subprocess.run([sys.executable, "-m", "slm", *argv], capture_output=True, timeout=120)
        err = r.stderr.decode("utf-8", "replace")
        assert r.returncode in (1, 2) and len(err.splitlines()) == 1, err
        assert err.startswith("slm generate: error: ") and message in err, err
