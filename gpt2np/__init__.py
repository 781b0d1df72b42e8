"""gpt2np: GPT-2 inference in pure NumPy.

`GPT2`, `GPT2Config` and `Tokenizer` are imported on first use (PEP 562's module `__getattr__`), so
that `python -m gpt2np` starts without NumPy: the command line takes charge of Ctrl-C and of errors
before anything heavy is imported.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and linters; at run time, __getattr__ imports them when first used
    from .api import GPT2
    from .config import GPT2Config
    from .tokenizer import Tokenizer

__all__ = ["GPT2", "GPT2Config", "Tokenizer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "GPT2":
        from .api import GPT2 as value
    elif name == "GPT2Config":
        from .config import GPT2Config as value
    elif name == "Tokenizer":
        from .tokenizer import Tokenizer as value
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__():
    return sorted({*globals(), *__all__})
