"""Quantized layers swapped in for the reference model's linear layers and embedding: slm's own
int8/int4 formats (`layers`), a GGUF file's blocks kept as they are (`gguf_layers`), and the
functions that put them into a model, after loading or while it loads (`apply`)."""
