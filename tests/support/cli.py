"""Running `slm` in the test's own process (faster than a subprocess; capsys sees its output)."""

from __future__ import annotations


def cli(capsys, *argv) -> tuple[int, str]:
    """Run `slm ARGV` in this process: (exit code, stderr)."""
    from slm.cli import main
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err
