"""Fixtures shared by the test files, each written once per session.

- `toy_folder` / `toy_model`: a 2-layer, 32-wide random checkpoint with GPT-2's whole vocabulary
  (so text round-trips) and a 128-token context, for the command line and the server, where only
  shapes and plumbing matter. (`tiny` is the small trained model in the package: tests/test_tiny.py.)
- `gpt2_folder` / `gpt2_pair`: a random checkpoint of the full gpt2 shape (124M) in transformers'
  layout, and (gpt2np's model, transformers' GPT2LMHeadModel) loaded from it, for the parity tests
  that need the real shape. Writing it costs a few seconds and 500 MB of disk, so once a session.

Test files import their helpers (`checkpoints`, `fakehub`) by name: pytest puts this folder on the
import path, so no test file patches sys.path.
"""

from __future__ import annotations

import pytest
from checkpoints import TOY, hf_reference, write_checkpoint

from gpt2np import GPT2, GPT2Config
from gpt2np.checkpoint import random_state_dict, save_checkpoint


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    save_checkpoint(folder, TOY, random_state_dict(TOY, seed=0))
    return folder


@pytest.fixture(scope="session")
def toy_model(toy_folder) -> GPT2:
    return GPT2.from_pretrained(toy_folder)


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("gpt2"), GPT2Config.preset("gpt2"), layout="transformers", seed=2)


@pytest.fixture(scope="session")
def gpt2_pair(gpt2_folder):
    """(gpt2np's GPT2, transformers' GPT2LMHeadModel in eval mode) of the same full-size checkpoint."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return GPT2.from_pretrained(gpt2_folder), hf_reference(gpt2_folder)
