"""A CLI that explains itself: `slm --version`, a help line for every flag and command, and every
default shown in --help, next to its own flag."""

from __future__ import annotations

import argparse
import os
import tomllib

import pytest

from slm.cli import COMMANDS, GROUPS, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of `slm`, of each group (`slm data`) and of each command."""
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return ([("slm", top)] + [(f"slm {g}", sub.choices[g]) for g in GROUPS]
            + [(f"slm {words}", p) for words, p in top.verb_parsers.items()])


def entry(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """What --help prints for one flag, whitespace collapsed."""
    formatter = parser._get_formatter()
    return " ".join(formatter._format_action(action).split())


def test_version(capsys):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"slm {declared}\n"
    import slm
    assert slm.__version__ == declared


def test_every_command_group_and_flag_has_a_help_line():
    every = parsers()
    assert {n for n, _ in every} == {"slm"} | {f"slm {g}" for g in GROUPS} | {f"slm {w}" for w in COMMANDS}
    missing = []
    for name, p in every:
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if isinstance(a, argparse._SubParsersAction):  # the commands it lists
                missing += [f"{name} {c.dest}" for c in a._choices_actions if not (c.help or "").strip()]
            elif not (a.help or "").strip():
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, f"no help line: {missing}"


def test_help_shows_every_default_beside_its_flag():
    """A flag whose default is a value (not None or False: their help says what absence means)
    shows it in its own entry of --help: "(default: X)", added by the HelpFormatter unless the
    help already names it."""
    hidden = []
    for name, p in parsers():
        for a in p._actions:
            if not a.option_strings or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if a.default is None or a.default is False or a.default == [] or a.default == argparse.SUPPRESS:
                continue
            text = entry(p, a)
            if f"default: {a.default}" not in text and not ("default" in text and str(a.default) in text):
                hidden.append(f"{name} {a.option_strings[0]} (default {a.default!r}): {text}")
    assert not hidden, "\n".join(hidden)


def test_help_names_no_default_that_differs_from_the_flags():
    """Where a help line writes its default out ("default: 32"), that is the value the flag takes
    when absent: None (the code decides), or the same value."""
    wrong = []
    for name, p in parsers():
        for a in p._actions:
            if not a.option_strings or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            said = (a.help or "").split("default: ", 1)
            if len(said) == 2 and a.default not in (None, False, [], argparse.SUPPRESS):
                value = said[1].rstrip(")").split(";")[0].split(",")[0].strip()
                if value != str(a.default):
                    wrong.append(f"{name} {a.option_strings[0]}: help says {value!r}, the default is {a.default!r}")
    assert not wrong, "\n".join(wrong)
