"""Built-in training data: a synthetic corpus of simple English stories and lessons (see synth)."""
