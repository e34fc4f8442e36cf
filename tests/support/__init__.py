"""Helpers shared by the tests: model builders, the offline guard, the PII corpus, data files."""
