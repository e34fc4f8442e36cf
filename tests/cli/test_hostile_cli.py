"""Hostile command lines (Hypothesis): every verb of `slm`, run in-process from a valid command
line of its own with one to three of its arguments (or its stdin) replaced by something it must
refuse: wrong types, NaN and infinity, zero, negative and huge numbers, non-UTF-8 text (as Python
receives it from a command line: lone surrogates), paths that are files where folders go or the
reverse, missing paths, and files that are corrupt, not UTF-8 or JSON nested thousands deep.

Each case must end with a non-zero exit code and exactly one line on stderr (besides a progress
bar that was showing), starting with
`slm VERB: error:` (the verb named, not only its group), no traceback and no "internal error";
no file of the test's world changes, and no `.tmp` file is left anywhere in it. The valid command
lines are cheap (tiny models, a step or two), so a hostile value that is not refused shows up as a
failed assertion, not as a hung test.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.models import CORPUS, build_tokenizer, make_checkpoint

N_CASES = int(os.environ.get("SLM_HOSTILE_CASES", 2000))  # fewer while working on a fix
CASE_SECONDS = 60  # a case still running after this is a hostile value nobody refused

# -- the world: the files every case starts from --------------------------------------------------


def _model_variant(world: str, name: str, model: str, change) -> str:
    path = os.path.join(world, name)
    shutil.copytree(model, path)
    cfg_path = os.path.join(path, "config.json")
    change(path, cfg_path)
    return path


def _config_edit(**fields):
    def change(path, cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.update(fields)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)  # allow_nan: NaN is written as the bare NaN Python's json reads back
    return change


def _write(path: str, data: bytes | str) -> str:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("world"))
    tok = os.path.join(w, "tok")
    build_tokenizer(tok)
    model = make_checkpoint(os.path.join(w, "model"), "llama", tok)
    paths = {"model": model, "tok": tok}
    paths["cfg_list"] = _model_variant(w, "cfg_list", model, lambda p, c: _write(c, "[]"))
    paths["cfg_null"] = _model_variant(w, "cfg_null", model, lambda p, c: _write(c, "null"))
    paths["cfg_deep"] = _model_variant(w, "cfg_deep", model, lambda p, c: _write(c, "[" * 100_000))
    paths["cfg_dir"] = _model_variant(w, "cfg_dir", model, lambda p, c: (os.remove(c), os.mkdir(c)))
    paths["cfg_eps"] = _model_variant(w, "cfg_eps", model, _config_edit(rms_norm_eps=-1e-5))
    paths["cfg_nan"] = _model_variant(w, "cfg_nan", model, _config_edit(rms_norm_eps=float("nan")))
    paths["cfg_type"] = _model_variant(w, "cfg_type", model, _config_edit(hidden_size="big", rope_theta=[1]))
    paths["tmpl_syntax"] = _model_variant(w, "tmpl_syntax", model,
                                          lambda p, c: _write(os.path.join(p, "chat_template.jinja"), "{% for %}"))
    paths["tmpl_sandbox"] = _model_variant(w, "tmpl_sandbox", model, lambda p, c: _write(
        os.path.join(p, "chat_template.jinja"), "{{ messages.__class__.__mro__[1].__subclasses__() }}{{ ''.__class__ }}"))
    paths["tmpl_huge"] = _model_variant(w, "tmpl_huge", model, lambda p, c: _write(
        os.path.join(p, "chat_template.jinja"), "{{ 'x' * 10**10 }}"))
    paths["tmpl_pow"] = _model_variant(w, "tmpl_pow", model, lambda p, c: _write(
        os.path.join(p, "chat_template.jinja"), "{{ 9 ** 9 ** 9 ** 9 ** 9 }}"))
    os.makedirs(os.path.join(w, "empty_dir"))
    os.makedirs(os.path.join(w, "adir"))
    _write(os.path.join(w, "adir", "keep.txt"), "a file in a folder\n")
    paths["empty_dir"], paths["adir"] = os.path.join(w, "empty_dir"), os.path.join(w, "adir")
    paths["afile"] = _write(os.path.join(w, "afile.txt"), "just a text file\n")
    paths["junk_gguf"] = _write(os.path.join(w, "junk.gguf"), b"GGUF" + os.urandom(200))
    # not UTF-8, and no byte-order mark (b"\xff\xfe" would make it UTF-16, which slm reads)
    paths["binary"] = _write(os.path.join(w, "binary.txt"), b"text \xfa\x80\x81 not utf-8 \xc3\x28" * 20)
    paths["deep_json"] = _write(os.path.join(w, "deep.json"), "[" * 50_000 + "]" * 50_000)
    paths["deep_jsonl"] = _write(os.path.join(w, "deep.jsonl"), '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    paths["not_json"] = _write(os.path.join(w, "not.jsonl"), "{this is not json\n")
    paths["chats"] = _write(os.path.join(w, "chats.jsonl"), "".join(
        json.dumps({"messages": [{"role": "user", "content": f"Tell me a story {i}."},
                                 {"role": "assistant", "content": CORPUS[i % len(CORPUS)]}]}) + "\n"
        for i in range(8)))
    paths["task"] = _write(os.path.join(w, "task.jsonl"), "".join(
        json.dumps({"ctx": "The cat", "endings": [" sat.", " flew.", " ran.", " slept."], "label": i % 4}) + "\n"
        for i in range(4)))
    paths["text"] = _write(os.path.join(w, "text.txt"), "\n\n".join(CORPUS * 3))
    paths["prompts"] = _write(os.path.join(w, "prompts.jsonl"), '{"prompt": "What is 2 + 2?"}\n')
    from slm.data.prepare import prepare
    from slm.runtime.tokenizer import Tokenizer
    paths["data"] = os.path.join(w, "data")
    prepare(paths["text"], Tokenizer.from_dir(tok), paths["data"], progress=False)
    paths["missing"] = os.path.join(w, "no", "such", "path")
    paths["under_file"] = os.path.join(paths["afile"], "inside")
    paths["root"] = w
    return paths


def snapshot(root: str) -> dict[str, tuple]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.join(folder, name)] = ("dir",)
        for name in files:
            p = os.path.join(folder, name)
            with open(p, "rb") as f:
                out[p] = (os.path.getsize(p), hashlib.sha1(f.read()).hexdigest())
    return out


# -- hostile values, by the kind of argument -------------------------------------------------------
SURROGATES = ["\udcff", "caf\udce9", "a\ud800b", "\udc80\udc81"]  # non-UTF-8 bytes as argv decodes them
NOT_A_NUMBER = ["abc", "", "1.5.2", "0x", "--", "\udcff", "1e", "NaN"]
HUGE = ["1000000000", "99999999999999999999", "1e30"]


def ints(bad_below: int, huge: bool = False):
    """Hostile values of an integer flag whose smallest valid value is bad_below."""
    small = st.integers(min_value=-10**6, max_value=bad_below - 1).map(str)
    pool = NOT_A_NUMBER + ["1.5", "nan", "inf", "1e400"] + (HUGE if huge else [])
    return small | st.sampled_from(pool)


def floats(low: float | None = None, high: float | None = None, low_ok: bool = False):
    """Hostile values of a float flag valid in [low, high] (or (low, high] unless low_ok)."""
    pool = ["nan", "inf", "-inf", "1e400", "-1e400", "abc", "", "\udcff", "1,5"]
    out = st.sampled_from(pool)
    if low is not None:
        below = st.floats(max_value=low, exclude_max=low_ok, allow_nan=False, allow_infinity=False,
                          min_value=-1e6).map(repr)
        out = out | below
    if high is not None:
        out = out | st.floats(min_value=high, exclude_min=True, max_value=1e6, allow_nan=False).map(repr)
    return out


def choice():
    return st.text(alphabet="abcxyz-_0123456789\udcff", min_size=1, max_size=6).map(lambda s: "zz" + s)


def text():
    return st.sampled_from(SURROGATES) | st.builds(lambda a, s: a + s, st.text(max_size=5), st.sampled_from(SURROGATES))


def paths(world, *names):
    return st.sampled_from([world[n] for n in names])


MODELS = ("missing", "afile", "junk_gguf", "empty_dir", "cfg_list", "cfg_null", "cfg_deep", "cfg_dir", "cfg_eps",
          "cfg_nan", "cfg_type", "binary", "under_file")
TEMPLATES = ("tmpl_syntax", "tmpl_sandbox", "tmpl_huge", "tmpl_pow")
IN_FILES = ("missing", "adir", "binary", "deep_json", "deep_jsonl", "not_json", "under_file", "empty_dir")
DATA_INPUTS = ("missing", "binary", "deep_jsonl", "not_json", "under_file", "empty_dir")  # a folder of text is valid
IN_DIRS = ("missing", "afile", "empty_dir", "under_file", "binary")
OUT_DIRS = ("afile", "under_file", "binary")  # a file, or a path inside one
OUT_FILES = ("adir", "under_file", "empty_dir", "root")  # a folder, or a path inside a file
DEVICES = ["banana", "cuda", "cuda:7", "mps", "tpu", "cpu:x", "\udcff", ""]


def sampling(w):
    return {"--max-new-tokens": ints(1), "--temperature": floats(0, low_ok=False) | st.just("-0.5"),
            "--top-k": ints(0), "--top-p": floats(0, 1), "--repetition-penalty": floats(0),
            "--seed": st.sampled_from(NOT_A_NUMBER + ["1.5"]), "--dtype": choice(), "--device": st.sampled_from(DEVICES),
            "--quantize": choice(), "--group-size": ints(1)}


def verbs(w) -> dict[str, tuple[list[str], dict]]:
    """verb[:variant] -> (a valid command line, {flag: strategy of values it must refuse}). A flag
    absent from the valid line is added with its hostile value; "<stdin>" replaces the standard input."""
    out_dir, out_file = "<out_dir>", "<out_file>"
    models = paths(w, *MODELS)
    return {
        "generate": (["--model", w["model"], "--prompt", "Once upon", "--max-new-tokens", "2"],
                     {"--model": models, "--prompt": text(), **sampling(w), "--receipt": paths(w, *OUT_FILES)}),
        "chat": (["--model", w["model"], "--max-new-tokens", "2"],
                 {"--model": models | paths(w, *TEMPLATES), "--system": text(), **sampling(w),
                  "<stdin>": st.sampled_from([b"\xff\xfehello\n", b"caf\xe9\n", b"\x80\x81\x82\n"])}),
        "info": (["--model", w["model"]], {"--model": models, "--preset": choice()}),
        "train": (["--out", out_dir, "--data", w["data"], "--tokenizer", w["tok"], "--preset", "slm-1m",
                   "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-every", "100"],
                  {"--out": paths(w, *OUT_DIRS), "--data": paths(w, *IN_DIRS), "--tokenizer": paths(w, *IN_DIRS),
                   "--preset": choice(), "--dim": ints(1), "--layers": ints(1), "--heads": ints(1), "--mlp": ints(1),
                   "--seq-len": ints(2, huge=True), "--batch-size": ints(1, huge=True), "--grad-accum": ints(1),
                   "--max-steps": ints(1), "--max-minutes": floats(0), "--lr": floats(0), "--muon-lr": floats(0),
                   "--warmup": ints(0), "--cooldown": floats(0, 1, low_ok=True), "--eval-every": ints(1),
                   "--save-every": ints(1), "--log-every": ints(1), "--seed": st.sampled_from(NOT_A_NUMBER),
                   "--device": st.sampled_from(DEVICES), "--optimizer": choice(), "--schedule": choice()}),
        "tokenizer train": (["--data", w["text"], "--vocab-size", "300", "--out", out_dir],
                            {"--data": paths(w, *DATA_INPUTS), "--vocab-size": ints(1, huge=True) | st.just("10"),
                             "--out": paths(w, *OUT_DIRS)}),
        "data synth": (["--out", out_dir, "--n-docs", "20"],
                       {"--out": paths(w, *OUT_DIRS), "--n-docs": ints(1), "--seed": st.sampled_from(NOT_A_NUMBER)}),
        "data prepare": (["--data", w["text"], "--tokenizer", w["tok"], "--out", out_dir],
                         {"--data": paths(w, *DATA_INPUTS), "--tokenizer": paths(w, *IN_DIRS), "--out": paths(w, *OUT_DIRS),
                          "--val-every": ints(1)}),
        "data scrub": (["--input", w["text"], "--output", out_file],
                       {"--input": paths(w, "missing", "binary", "deep_jsonl", "under_file", "empty_dir"),
                        "--output": paths(w, "under_file", "root"), "--report": paths(w, *OUT_FILES)}),
        "data distill": (["--teacher", w["model"], "--prompts", "builtin", "--n-prompts", "1", "--max-tokens", "2",
                          "--out", out_file],
                         {"--teacher": models, "--prompts": paths(w, *IN_FILES), "--out": paths(w, *OUT_FILES),
                          "--max-tokens": ints(1), "--temperature": floats(0, low_ok=False) | st.just("-1"),
                          "--n-prompts": ints(1), "--limit": ints(1), "--seed": st.sampled_from(NOT_A_NUMBER)}),
        "finetune": (["--model", w["model"], "--data", w["chats"], "--out", out_dir, "--max-steps", "1",
                      "--batch-size", "2", "--seq-len", "64"],
                     {"--model": models | paths(w, *TEMPLATES), "--data": paths(w, *IN_FILES),
                      "--out": paths(w, *OUT_DIRS), "--lora-r": ints(1), "--lora-alpha": floats(0),
                      "--lora-dropout": floats(0, 1, low_ok=True) | st.just("1"), "--max-steps": ints(1),
                      "--epochs": floats(0), "--lr": floats(0), "--batch-size": ints(1, huge=True),
                      "--seq-len": ints(2, huge=True), "--val-fraction": floats(0, 1, low_ok=True) | st.just("1"),
                      "--eval-every": ints(1), "--log-every": ints(1), "--warmup": ints(0),
                      "--seed": st.sampled_from(NOT_A_NUMBER), "--quantize": choice(), "--group-size": ints(1)}),
        "serve": (["--model", w["model"], "--port", "0"],
                  {"--model": models, "--port": st.sampled_from(["99999", "65536", "-1", "abc", "1e3", "\udcff"]),
                   "--max-batch": ints(1, huge=True), "--context": ints(1, huge=True), "--dtype": choice(),
                   "--device": st.sampled_from(DEVICES), "--quantize": choice(), "--group-size": ints(1)}),
        "quantize": (["--model", w["model"], "--bits", "8", "--out", out_dir],
                     {"--model": models, "--bits": st.sampled_from(["3", "16", "x", "-8", "nan"]),
                      "--group-size": ints(1), "--out": paths(w, *OUT_DIRS, "model", "adir")}),
        "export": (["--model", w["model"], "--format", "gguf", "--out", out_file],
                   {"--model": models, "--format": choice(), "--dtype": choice(),
                    "--out": paths(w, *OUT_FILES, "afile", "model")}),
        "lora merge": (["--model", w["model"], "--adapter", w["adir"], "--out", out_dir],
                       {"--model": models, "--adapter": paths(w, *IN_DIRS), "--out": paths(w, *OUT_DIRS, "model")}),
        "bench": (["--preset", "slm-1m", "--random-weights", "--new-tokens", "2"],
                  {"--preset": choice(), "--new-tokens": ints(1), "--threads": ints(1), "--quantize": choice(),
                   "--group-size": ints(1)}),
        "cost": (["--params", "124M", "--tokens", "2.5B"],
                 {"--params": st.sampled_from(["1e400", "-5", "0", "abc", "nan", "inf", "1e200B", "\udcff"]),
                  "--tokens": st.sampled_from(["1e400", "-1", "0", "x", "nan", "-inf", "9e307T"]),
                  "--gpu": choice(), "--gpus": ints(1), "--mfu": floats(0, 1), "--pue": floats(1, low_ok=True),
                  "--grid": floats(0, low_ok=True), "--price": floats(0, low_ok=True)}),
        "cost:compare": (["--compare", "--out", out_file],
                           {"--out": paths(w, *OUT_FILES), "--receipts": paths(w, "missing", "afile", "under_file")}),
        "eval": (["--model", w["model"], "--task", w["task"], "--task-format", "hellaswag"],
                 {"--model": models, "--task": paths(w, *IN_FILES), "--task-format": choice(),
                  "--num-fewshot": ints(0), "--limit": ints(1), "--batch-size": ints(1), "--max-length": ints(2),
                  "--seed": st.sampled_from(NOT_A_NUMBER), "--output": paths(w, *OUT_FILES),
                  "--dtype": choice(), "--device": st.sampled_from(DEVICES)}),
        "eval:text": (["--model", w["model"], "--text", w["text"]],
                        {"--text": paths(w, "missing", "adir", "binary", "under_file"), "--model": models}),
        "explain": (["--model", w["model"], "--prompt", "The cat", "--out", out_file + ".html", "--steps", "2",
                     "--no-figures"],
                    {"--model": models, "--prompt": text(), "--target": text(), "--contrast": text(),
                     "--out": paths(w, *OUT_FILES) | st.just(w["afile"]), "--top-k": ints(1), "--steps": ints(1),
                     "--layers": st.sampled_from(["99", "-1", "a-b", "5-2", "1,,2", "\udcff"])}),
    }


_CASES: dict[str, dict] = {}


def cases_of(world) -> dict:
    """verbs(world), built once (not a fixture: Hypothesis would print the whole table with every
    failure)."""
    if world["root"] not in _CASES:
        _CASES[world["root"]] = verbs(world)
    return _CASES[world["root"]]


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs too long (BaseException: the CLI does not catch it)."""


def run_cli(argv: list[str], stdin: bytes | None) -> tuple[int, str]:
    from slm.cli import main
    err, out = io.StringIO(), io.StringIO()
    stdin_stream = io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8")
    old_stdin = sys.stdin

    def alarm(signum, frame):
        raise CaseTimeout(" ".join(argv))
    old_handler = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_SECONDS)
    sys.stdin = stdin_stream
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        sys.stdin = old_stdin
    # the line naming a model once it has loaded (`slm: NAME: PRECISION`) is not an error line
    return code, "".join(line for line in err.getvalue().splitlines(True) if not line.startswith("slm: "))


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SLM_RECEIPTS", str(tmp_path / "receipts"))
    monkeypatch.setenv("SLM_NO_KERNELS", "1")  # no C++ build inside a case's time limit
    monkeypatch.delenv("SLM_DEBUG", raising=False)


def hostile(data, cases) -> tuple[str, list[str], dict[str, str]]:
    """A verb, its valid command line, and the arguments replaced (drawn one by one, so that a
    failure shows the draws, not the whole table)."""
    verb = data.draw(st.sampled_from(sorted(cases)), label="verb")
    base, slots = cases[verb]
    chosen = data.draw(st.lists(st.sampled_from(sorted(slots)), min_size=1, max_size=3, unique=True), label="flags")
    replaced = {flag: data.draw(slots[flag], label=flag) for flag in chosen}
    return verb, base, replaced


def build_argv(verb: str, base: list[str], replaced: dict[str, str], out: str) -> tuple[list[str], bytes | None]:
    argv = verb.split(":")[0].split()
    args = [a.replace("<out_dir>", out).replace("<out_file>", out + ".out") for a in base]
    for flag, value in replaced.items():
        if flag == "<stdin>":
            continue
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    stdin = replaced.get("<stdin>", b"hello\n")
    return argv + args, stdin


@settings(max_examples=N_CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_verb_refuses_hostile_arguments_with_one_line(world, data):
    verb, base, replaced = hostile(data, cases_of(world))
    out = os.path.join(world["root"], "runs", "out")
    before = snapshot(world["root"])
    argv, stdin = build_argv(verb, base, replaced, out)
    try:
        code, err = run_cli(argv, stdin)
    finally:
        shutil.rmtree(os.path.join(world["root"], "runs"), ignore_errors=True)
    # A progress bar (tqdm redraws its line after a carriage return) may be showing when an input
    # turns out bad part-way through; the lines that count are the others.
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]
    shown = f"slm {' '.join(a.encode('utf-8', 'backslashreplace').decode() for a in argv)}"
    name = verb.split(":")[0]
    assert code != 0, f"{shown}\nexit code 0; stderr:\n{err}"
    assert len(lines) == 1, f"{shown}\nexpected one error line, got:\n{err}"
    assert lines[0].startswith(f"slm {name}: error: "), f"{shown}\n{err}"
    assert "Traceback" not in err and "internal error" not in err, f"{shown}\n{err}"
    after = snapshot(world["root"])
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p)
                     and not p.startswith(os.path.join(world["root"], "runs")))
    assert not changed, f"{shown}\nchanged files outside --out: {changed}"
    tmp = [p for p in after if ".tmp" in os.path.basename(p)]
    assert not tmp, f"{shown}\nleft behind: {tmp}"
