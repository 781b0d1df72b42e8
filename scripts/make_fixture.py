"""Regenerate tests/fixtures/tiny-gpt2: a tiny random GPT-2 checkpoint and transformers' logits for it.

The committed files let the parity test run where torch is not installed. Run from the repo root:
    python scripts/make_fixture.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2np import GPT2Config
from gpt2np.checkpoint import random_state_dict, save_checkpoint

TESTS = Path(__file__).resolve().parent.parent / "tests"
FOLDER = TESTS / "fixtures" / "tiny-gpt2"


def write_tokenizer(folder, vocab_size):
    """The tests' helper (tests/checkpoints.py), loaded from its file: tests/ is not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("checkpoints", TESTS / "checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_tokenizer(folder, vocab_size)


def main() -> None:
    import torch
    from transformers import GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_ctx=32, vocab_size=1000)
    save_checkpoint(FOLDER, config, random_state_dict(config, seed=7, std=0.1))
    write_tokenizer(FOLDER, config.vocab_size)  # the checkpoint's own 1000-token tokenizer
    ids = np.random.default_rng(7).integers(0, config.vocab_size, size=(2, config.n_ctx))
    model = GPT2LMHeadModel.from_pretrained(FOLDER, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)).logits.numpy()
    np.savez_compressed(FOLDER / "reference.npz", ids=ids, logits=logits)
    print(f"wrote {FOLDER} (transformers logits for ids of shape {ids.shape})")


if __name__ == "__main__":
    main()
