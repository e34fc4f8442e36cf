"""The one sampler (runtime/sampling.py): many rows at once draw what each row draws alone, under
the same seeds; and the CLI built from the config dataclasses shows every default and helps every flag."""

import torch

from slm.runtime.sampling import (
    DEFAULT_TEMPERATURE,
    Row,
    Sampling,
    apply_repetition_penalty,
    sample,
    sample_rows,
)

V = 50
SETTINGS = [Sampling(temperature=1.0, seed=1), Sampling(temperature=0.7, top_k=5, seed=2),
            Sampling(temperature=1.3, top_p=0.8, seed=3), Sampling(temperature=0.0, seed=4),
            Sampling(temperature=0.9, top_k=10, top_p=0.9, seed=5), Sampling(temperature=1.0, seed=1)]


def test_rows_at_once_equal_each_row_alone():
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(len(SETTINGS), V, generator=g) * 3 for _ in range(40)]
    for x in steps:
        x[5] = x[0]
    rows = [Row(s, V, "cpu") for s in SETTINGS]
    batched = [sample_rows(x, rows) for x in steps]
    for i, s in enumerate(SETTINGS):
        gen = torch.Generator().manual_seed(s.seed)
        alone = [int(sample(x[i:i + 1], s, gen)) for x in steps]
        assert [b[i] for b in batched] == alone
    assert [b[0] for b in batched] == [b[5] for b in batched]  # same seed, same logits: same draws
    assert [b[0] for b in batched] != [b[1] for b in batched]
    assert [b[3] for b in batched] == [int(x[3].argmax()) for x in steps]


def test_rows_with_penalties_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(3, V, generator=g) for _ in range(30)]
    settings = [Sampling(presence_penalty=0.5, frequency_penalty=1.0), Sampling(repetition_penalty=1.5, seed=3,
                                                                                 temperature=0.8),
                Sampling(logit_bias={7: 5.0}, temperature=0.5, seed=9)]
    rows = [Row(s, V, "cpu", prompt=[1, 2, 3], index=i) for i, s in enumerate(settings)]
    batched = [sample_rows(x, rows) for x in steps]
    for i, s in enumerate(settings):
        row = Row(s, V, "cpu", prompt=[1, 2, 3], index=i)
        assert [b[i] for b in batched] == [sample_rows(x[i:i + 1], [row])[0] for x in steps]
    assert sum(b[2] == 7 for b in batched) > 20  # the bias shows


def test_openai_penalties_and_repetition_penalty_by_hand():
    logits = torch.randn(1, V)
    row = Row(Sampling(presence_penalty=0.7, frequency_penalty=1.3), V, "cpu")
    counts = torch.zeros(V)
    for _ in range(10):
        t = int((logits[0] - 1.3 * counts - 0.7 * (counts > 0).float()).argmax())
        assert sample_rows(logits, [row]) == [t]
        counts[t] += 1
    row = Row(Sampling(repetition_penalty=1.3), V, "cpu", prompt=[4, 4, 9])
    x = logits.clone()
    row.adjust(x[0])
    assert torch.equal(x, apply_repetition_penalty(logits, torch.tensor([[4, 9]]), 1.3))


def test_draws_only_kept_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0, 0.5]])
    gen = torch.Generator().manual_seed(0)
    for s, kept in ((Sampling(temperature=1.0, top_k=2), {0, 1}), (Sampling(temperature=1.0, top_p=0.8), {0, 1}),
                    (Sampling(temperature=1e-30), {0}), (Sampling(temperature=5e-324), {0})):
        assert {int(sample(logits, s, gen)) for _ in range(300)} == kept


def test_one_default_temperature():
    from slm.serve.engine import Params
    assert Sampling().temperature == DEFAULT_TEMPERATURE == Params(max_tokens=1).temperature


# -- the CLI's flags ---------------------------------------------------------------------------
def leaf_parsers(parser=None, words=()):
    """(words, parser) of every command of `slm`."""
    import argparse

    from slm.cli import build_parser
    parser = parser or build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(words), parser
    for sub in subs:
        for name, p in sub.choices.items():
            yield from leaf_parsers(p, (*words, name))


def options(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_every_flag_of_every_command_has_help():
    from slm.cli import COMMANDS
    leaves = dict(leaf_parsers())
    assert sorted(leaves) == sorted(COMMANDS)
    missing = [f"slm {words} {a.option_strings[0]}" for words, p in leaves.items() for a in options(p)
               if not (a.help or "").strip()]
    assert not missing, missing


def test_help_shows_each_default():
    for words, p in leaf_parsers():
        text = " ".join(p.format_help().split())
        for a in options(p):
            if a.default is not None and a.default is not False and a.default != []:
                assert f"default: {a.default}" in text or str(a.default) in (a.help or ""), \
                    f"slm {words} {a.option_strings[0]}: default {a.default!r} not in --help"


def test_flag_defaults_are_the_dataclasses():
    from slm.cli.finetune import FINETUNE
    from slm.cli.flags import defaults
    from slm.cli.run import SAMPLING
    from slm.cli.serve import SERVE
    from slm.cli.train import TRAIN
    from slm.finetune.sft import FinetuneConfig
    from slm.runtime.lm import LM
    from slm.serve.app import ServeConfig
    from slm.train.loop import TrainConfig
    leaves = dict(leaf_parsers())
    for words, source, table in (("train", TrainConfig, TRAIN), ("finetune", FinetuneConfig, FINETUNE),
                                 ("generate", Sampling, SAMPLING), ("chat", Sampling, SAMPLING),
                                 ("serve", ServeConfig, SERVE), ("generate", LM.stream, [("max_new_tokens",)]),
                                 ("chat", LM.chat, [("max_new_tokens",)]),
                                 ("data distill", Sampling, [("temperature",)])):
        parsed = {a.dest: a.default for a in options(leaves[words])}
        want = defaults(source)
        assert {row[0]: parsed[row[0]] for row in table} == {row[0]: want.get(row[0]) for row in table}, words
    assert {a.dest: a.default for a in options(leaves["generate"])}["temperature"] == DEFAULT_TEMPERATURE


def test_building_one_command_imports_only_its_module():
    import subprocess
    import sys
    code = ("import sys; from slm.cli import build_parser; build_parser(['generate']).parse_args(['generate', "
            "'--prompt', 'x']); print(sorted(m for m in ('slm.train.loop', 'slm.finetune.sft', 'slm.serve.app', "
            "'slm.cli.train', 'slm.cli.run') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['slm.cli.run']"


def aten_draws(monkeypatch) -> None:
    """_pick through its ATen ops, not kernels/cpu/sample.cpp's one call."""
    import slm.runtime.sampling as sampling
    fused_op = sampling.kernels.fused_op
    monkeypatch.setattr(sampling.kernels, "fused_op", lambda name: None if name == "sample_top_p" else fused_op(name))


def test_top_p_among_candidates_equals_the_full_sort(monkeypatch):
    """top_p looks among the most likely tokens first (NUCLEUS_WIDENING), widening the search only
    for the rows whose nucleus reaches further, and sorts a row's whole vocabulary only when no
    narrower search holds top_p: the draws are those of the full sort, for peaked rows (the first
    candidates suffice), flat ones (they do not) and rows without top_p, side by side in one batch."""
    import slm.runtime.sampling as sampling
    aten_draws(monkeypatch)
    V = 4096
    g = torch.Generator().manual_seed(2)
    settings = [Sampling(temperature=0.8, top_p=0.95, seed=1), Sampling(temperature=1.0, top_p=0.5, seed=2),
                Sampling(temperature=1.0, seed=3), Sampling(temperature=3.0, top_p=0.99, seed=4)]
    steps = []
    for _ in range(30):
        x = torch.randn(len(settings), V, generator=g)
        x[:2] *= 8  # peaked: a few tokens hold nearly all the probability
        steps.append(x)

    def draws(widening: tuple[int, ...]) -> list[list[int]]:
        monkeypatch.setattr(sampling, "NUCLEUS_WIDENING", widening)
        rows = [Row(s, V, "cpu") for s in settings]
        return [sample_rows(x, rows) for x in steps]
    sorted_fully = draws((2**62,))
    assert draws((256, 2**62)) == sorted_fully
    assert draws((256, 1024, 2**62)) == sorted_fully
    assert draws((1, 2, 2**62)) == sorted_fully  # never enough: every row falls back to the sort
    assert len({tuple(d) for d in sorted_fully}) > 1


def clear_of_boundaries(x: torch.Tensor, t: float, top_p: float, u: float, tol: float = 2e-6) -> bool:
    """Whether a draw's outcome is settled beyond float rounding: in float64, no token's share of
    those before it lies within tol of top_p, and u times the kept tokens' total lies more than tol
    (relatively) from each of their cumulative weights."""
    p = torch.exp((x.double() - x.max()) / t).masked_fill(x == float("-inf"), 0)
    w = p
    if top_p < 1:
        shares, idx = (p / p.sum()).sort(descending=True)
        before = shares.cumsum(0) - shares
        if (before - top_p).abs().min() < tol:
            return False
        w = torch.zeros_like(p)
        w[idx[before < top_p]] = shares[before < top_p]
    cdf = w.cumsum(0)
    return bool((cdf[w > 0] - u * cdf[-1]).abs().min() > tol * cdf[-1])


def test_the_fused_draw_draws_what_the_aten_ops_draw(monkeypatch):
    """sample_top_p (kernels/cpu/sample.cpp, one call for every row without top_k) draws the token
    _pick's ATen ops draw from the same row and uniform number: peaked rows and flat ones (whose
    nucleus reaches past the near candidates), a row with most tokens at -inf (never drawn), at
    several temperatures and top_p, top_p 1 among them. Draws whose outcome hangs on the last bits
    of a sum (the two add in different orders) are left out: a few in a hundred, flat rows of
    49,152 tokens. And a row
    draws the same alone as in a batch of rows."""
    import pytest

    from slm import kernels
    if kernels.fused_op("sample_top_p") is None:
        pytest.skip(f"the CPU kernels are unavailable: {kernels.kernel_error()}")
    g = torch.Generator().manual_seed(7)
    cases = []
    for n in range(400):
        Vn = (50, 4096, 49152)[n % 3]
        x = torch.randn(Vn, generator=g) * (8.0, 3.0, 1.0)[n % 5 % 3]
        if n % 7 == 0:
            masked = torch.rand(Vn, generator=g) < 0.9
            masked[n % Vn] = False  # one token at least left
            x[masked] = float("-inf")
        s = Sampling(temperature=(0.3, 0.8, 1.5)[n % 4 % 3], top_p=(0.5, 0.9, 0.95, 1.0)[n % 4], seed=n)
        cases.append((x, s))
    tokens = {}
    for fused in (True, False):
        if not fused:
            aten_draws(monkeypatch)
        tokens[fused] = [int(sample(x[None], s, torch.Generator().manual_seed(s.seed))) for x, s in cases]
    monkeypatch.undo()
    checked = 0
    for (x, s), a, b in zip(cases, tokens[True], tokens[False]):
        u = float(torch.rand(1, generator=torch.Generator().manual_seed(s.seed)))
        assert x[a] != float("-inf")
        if clear_of_boundaries(x, s.temperature, s.top_p, u):
            checked += 1
            assert a == b, (x.shape, s, u)
    assert checked >= 370, checked
    # alone and in a batch (rows of one vocabulary)
    xs = torch.stack([x for x, _ in cases if x.shape[0] == 4096][:12])
    ss = [s for x, s in cases if x.shape[0] == 4096][:12]
    rows = [Row(s, 4096, "cpu") for s in ss]
    batched = sample_rows(xs, rows)
    alone = [int(sample(xs[i:i + 1], s, torch.Generator().manual_seed(s.seed))) for i, s in enumerate(ss)]
    assert batched == alone
