#!/usr/bin/env python
"""Zero-shot evaluation of a GPT-2 checkpoint against the model card's table.

    python scripts/evaluate.py --model gpt2 --task lambada
    python scripts/evaluate.py --model gpt2 --task wikitext2 --data wikitext-2/wiki.test.tokens

The same command as `gpt2np eval`; see `--help` and docs/evaluation.md for each task's method.
"""

import sys

from gpt2np.evaluate import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/evaluate.py"))
