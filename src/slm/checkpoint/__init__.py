"""Checkpoint I/O: Hugging Face folders (hf.py) over a checked safetensors reader."""
