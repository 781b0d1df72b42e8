"""Regenerate tests/fixtures/tiny-gpt2: a tiny random GPT-2 checkpoint and transformers' logits for it.

The committed files let the parity test run where torch is not installed. Run from the repo root:
    python scripts/make_fixture.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2np import GPT2Config  # noqa: E402
from gpt2np.checkpoint import random_state_dict, save_checkpoint  # noqa: E402
from tests.checkpoints import write_tokenizer  # noqa: E402

FOLDER = ROOT / "tests" / "fixtures" / "tiny-gpt2"


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
