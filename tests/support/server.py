"""`slm serve` as a real process, for the tests that drive it: the process on a loopback port it
picks itself (--port 0; the first line it prints names the port), and the official `openai` client
pointed at it."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time

import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, log_path: str, *args: str, env: dict | None = None):
        self.log_path, self.port = log_path, None
        with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slm", "serve", "--model", model, "--port", "0", *args],
                stdout=log, stderr=subprocess.STDOUT, env=None if env is None else {**os.environ, **env})
        deadline = time.time() + 90
        while True:
            try:
                if self.port is None:  # no race for a free port: the server binds one and says which
                    found = re.search(r" at http://127\.0\.0\.1:(\d+)/", self.log())
                    if found is None:
                        raise ConnectionRefusedError
                    self.port = int(found.group(1))
                    self.url = f"http://127.0.0.1:{self.port}"
                self.health()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"slm serve did not start:\n{self.log()}")
                time.sleep(0.2)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def health(self) -> dict:
        status, data = self.request("GET", "/health")
        assert status == 200
        return json.loads(data)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
