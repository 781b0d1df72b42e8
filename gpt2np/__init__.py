"""gpt2np: GPT-2 inference in pure NumPy."""

from .config import GPT2Config
from .api import GPT2
from .tokenizer import Tokenizer

__all__ = ["GPT2", "GPT2Config", "Tokenizer"]
__version__ = "0.1.0"
