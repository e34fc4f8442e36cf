"""Reading and writing a user's files so that bad input gives one clear error and nothing is lost.

- `read_json` / `parse_json`: JSON from a file or a line, any failure (bad syntax, not UTF-8,
  nested deeper than the parser's stack, a folder where a file was expected) as one `ValueError`
  that names where it came from.
- `atomic_write`: write a file through a temporary beside it, moved into place only when complete,
  so that a reader never sees half a file and a failure leaves no `.tmp` behind.
- `output_file` / `output_folder`: check an output path before any work, so a long run does not
  fail at its end because `--out` names a folder where a file goes (or the reverse).

This module imports nothing from slm, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


def parse_json(text: str | bytes, where: str):
    """json.loads, with every failure a ValueError that starts with `where`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None


def read_json(path: str, what: str | None = None):
    """The JSON value in the file at path; `what` names the file in errors (default: the path)."""
    where = what or path
    if os.path.isdir(path):
        raise ValueError(f"{where} is a folder, not a JSON file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None
    return parse_json(raw, where)


def read_json_object(path: str, what: str | None = None) -> dict:
    """read_json, where the value must be an object ({...})."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise ValueError(f"{what or path}: expected a JSON object {{...}}, got {type(value).__name__}")
    return value


def output_file(path: str, flag: str = "--out") -> str:
    """Check that a file can be written at path: not an existing folder, and its folder is not a
    file. Returns path."""
    if not path:
        raise ValueError(f"{flag} is empty; give a file name")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    _not_inside_a_file(path, flag)
    return path


def output_folder(path: str, flag: str = "--out") -> str:
    """Check that path can be (or is) a folder: it is not an existing file, nor inside one."""
    if not path:
        raise ValueError(f"{flag} is empty; give a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; give a folder")
    _not_inside_a_file(path, flag)
    return path


def _not_inside_a_file(path: str, flag: str) -> None:
    """The nearest existing folder above path must be a folder (`afile.txt/out` cannot be made)."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")


def same_path(a: str, b: str) -> bool:
    """Whether two paths name the same file or folder (after links), or one lies inside the other."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return ra == rb or ra.startswith(rb + os.sep) or rb.startswith(ra + os.sep)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, flag: str = "--out"):
    """A temporary path beside `path`, for a writer that takes a path (safetensors' save_file);
    on success the file is fsynced and moved onto path, on failure removed. The folder is created
    if missing."""
    output_file(path, flag)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); a written file follows the umask
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: str | None = "utf-8", flag: str = "--out"):
    """Open a temporary file beside path for writing; on success it is fsynced and moved onto
    path, on failure removed (atomic_path)."""
    with atomic_path(path, flag) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def write_json(path: str, obj, indent: int = 2, flag: str = "--out") -> None:
    """Write obj as JSON atomically; NaN and infinity are refused (they are not JSON)."""
    with atomic_write(path, flag=flag) as f:
        json.dump(obj, f, indent=indent, allow_nan=False)
        f.write("\n")
