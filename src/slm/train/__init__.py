"""Training from scratch: the loop, checkpoints and resume (loop.py)."""
