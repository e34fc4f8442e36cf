"""What most serving tests drive: a tiny random Llama checkpoint (`model_dir`) served as 'tiny' by
a real `slm serve --max-batch 4` (`server`), one of each per test module. A module that needs
another model or other flags defines its own `model_dir` or `server`, which take precedence."""

from __future__ import annotations

import pytest

from support.models import make_checkpoint
from support.server import Server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("serve") / "tiny"), "llama", tokenizer_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, str(tmp_path_factory.mktemp("log") / "server.log"), "--max-batch", "4")
    yield s
    s.stop()
