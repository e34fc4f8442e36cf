"""Local serving: an OpenAI-compatible API with continuous batching, and a chat page.

    slm serve --model DIR        # http://127.0.0.1:8000/ (chat page), http://127.0.0.1:8000/v1 (API)
"""

from .app import create_app, run

__all__ = ["create_app", "run"]
