"""Running a model: loading (`lm.load`), the tokenizer, sampling and generation."""
