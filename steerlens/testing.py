"""Test support, outside the public API: tiny random models (GPT-2-like and Llama-like, float64
by default) and a fake tokenizer, for tests, doctests and examples that need no real model.

>>> from steerlens.testing import WhitespaceTokenizer, tiny_model
>>> tiny_model("gpt2").cfg.n_layers
2
>>> WhitespaceTokenizer(["a", " b"]).encode("a b")
[0, 1]
"""

from steerlens.concepts.tokens import _WhitespaceTokenizer as WhitespaceTokenizer
from steerlens.tiny import FLAVOURS, tiny_config, tiny_model

__all__ = ["FLAVOURS", "WhitespaceTokenizer", "tiny_config", "tiny_model"]
