"""gpt2np: GPT-2 inference in pure NumPy."""

from .tokenizer import Tokenizer

__all__ = ["Tokenizer"]
__version__ = "0.1.0"
