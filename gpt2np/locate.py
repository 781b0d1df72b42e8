"""Where a model name's checkpoint is: the one rule every loader follows.

1. A folder at that path, if there is one: a local folder always wins, whatever its name.
2. A model that ships inside the package (`BUNDLED`): `tiny`, a small GPT-2 trained on Python's
   standard library (gpt2np/models/tiny, made by scripts/train_tiny.py). No network, no cache, no token.
3. Otherwise a hub repo id (`gpt2`, `openai-community/gpt2-medium`, ...), fetched into the HuggingFace
   cache unless already there (`gpt2np.hub.snapshot_download`).
"""

from __future__ import annotations

from pathlib import Path

# Models inside the package, by short name: folders in the hub's layout.
BUNDLED = {"tiny": Path(__file__).resolve().parent / "models" / "tiny"}

# What every command adds to an error that follows a failed download.
OFFLINE_HINT = "to try gpt2np with no network, use the model that ships with it: --model tiny"


def checkpoint_folder(
    name_or_path, *, revision="main", cache_dir=None, token=None, offline=None, progress=True
) -> Path:
    """The folder holding the checkpoint `name_or_path` names, by the module's rule."""
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder
    text = str(name_or_path)
    if text in BUNDLED:
        return BUNDLED[text]
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise ValueError(f"no checkpoint folder at {text!r}: pass an existing folder or a hub repo id like 'gpt2'")
    from .hub import snapshot_download

    return snapshot_download(
        text, revision=revision, cache_dir=cache_dir, token=token, offline=offline, progress=progress
    )
