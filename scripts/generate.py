#!/usr/bin/env python3
"""Continue a prompt with GPT-2 and print the text: the same as `gpt2np generate`.

    python scripts/generate.py "I believe the meaning of life is"
    python scripts/generate.py --help

It runs from a fresh checkout without installing gpt2np: the repository root is put on the
import path when gpt2np is not installed.
"""

import sys
from pathlib import Path


def import_cli():
    try:
        from gpt2np import cli
    except ModuleNotFoundError as e:
        if e.name != "gpt2np":
            raise
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from gpt2np import cli
    return cli


if __name__ == "__main__":
    try:
        cli = import_cli()
    except ModuleNotFoundError as e:  # a dependency of gpt2np, not gpt2np itself
        print(f"generate.py: error: gpt2np needs the {e.name!r} package; install its requirements with "
              "`pip install -e .` in the repository root", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before the command line could take charge: the same exit as after
        from gpt2np.console import interrupted

        sys.exit(interrupted("generate.py"))
    sys.exit(cli.main(sys.argv[1:], prog="generate.py", command="generate"))
