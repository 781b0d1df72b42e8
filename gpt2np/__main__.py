"""`python -m gpt2np ...` runs the gpt2np command line (see gpt2np/cli.py)."""

import sys

if __name__ == "__main__":
    try:
        from .cli import main
    except KeyboardInterrupt:  # Ctrl-C before the command line could take charge: the same exit as after
        from .console import interrupted

        sys.exit(interrupted("python -m gpt2np"))
    sys.exit(main(prog="python -m gpt2np"))
