#!/usr/bin/env python3
"""Continue a prompt with GPT-2 and print the text: the same as `gpt2np generate`.

    python scripts/generate.py "I believe the meaning of life is"
    python scripts/generate.py --help

Like every script here, it imports gpt2np as installed: `pip install -e .` in the repository root.
"""

import sys


def import_cli():
    from gpt2np import cli

    return cli


if __name__ == "__main__":
    try:
        cli = import_cli()
    except ModuleNotFoundError as e:  # gpt2np, or a package it needs, is not installed
        print(
            f"generate.py: error: the {e.name!r} package is missing; install gpt2np and its requirements with "
            "`pip install -e .` in the repository root",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before the command line could take charge: the same exit as after
        from gpt2np.console import interrupted

        sys.exit(interrupted("generate.py"))
    sys.exit(cli.main(sys.argv[1:], prog="generate.py", command="generate"))
