"""Checkpoint I/O: one format-neutral loader (loader.py) fed by Hugging Face folders (hf.py, over
a checked safetensors reader) and GGUF files (gguf.py, gguf_tokenizer.py); writers for both (hf.py,
gguf_write.py). Family-specific names and conventions come from slm.model.families."""
