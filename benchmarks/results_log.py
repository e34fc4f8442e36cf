"""Where the benchmarks keep their results: one JSON object a line, appended to
benchmarks/results/<benchmark>.jsonl, which benchmarks/report.py turns into docs/benchmarks.md.

    from results_log import record
    record("decode", model="stories15m", transformers_tok_s=69.5, slm_tok_s=162.9, vs_transformers=2.34)

Each line holds the benchmark's name, the date (UTC, ISO), the machine (CPU model, torch's thread
count, torch version, and the GPU when one was used), the command that ran (this process's command
line, unless given) and then the measured values, in the order given. A ratio against the peer
measured in the same run is named vs_<peer>. The file is only ever appended to, so a figure quoted
in the docs keeps its row however many runs come after it.

SLM_RESULTS_DIR writes elsewhere (a lent machine's output folder, for instance);
SLM_RESULTS_DIR=off writes nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def machine_info(device=None) -> dict:
    """The CPU (as receipts name it), torch's threads and version; with a CUDA device, its name too."""
    import torch

    from slm.footprint.devices import cpu_name
    m = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device is not None and torch.device(device).type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
    return m


def command_line() -> str:
    """This process's command line, the script's path relative to the repository."""
    script = os.path.abspath(sys.argv[0])
    if script.startswith(REPO + os.sep):
        script = os.path.relpath(script, REPO)
    return "python " + shlex.join([script, *sys.argv[1:]])


def record(benchmark: str, *, command: str | None = None, machine: dict | None = None, **values) -> dict:
    """Append one result to benchmarks/results/<benchmark>.jsonl and return it."""
    row = {"benchmark": benchmark,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": machine if machine is not None else machine_info(),
           "command": command if command is not None else command_line(),
           **values}
    folder = os.environ.get("SLM_RESULTS_DIR", RESULTS)
    if folder != "off":
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{benchmark}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    return row
