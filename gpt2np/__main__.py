"""`python -m gpt2np ...` runs the gpt2np command line (see gpt2np/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m gpt2np"))
