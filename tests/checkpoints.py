"""Random GPT-2 checkpoints written in the layouts the hub serves, for tests.

- "openai": openai-community/gpt2's file: names without a prefix, the causal-mask buffers
  `h.N.attn.bias` [1, 1, n_ctx, n_ctx] stored as tensors, no `lm_head.weight`.
- "transformers": what transformers writes today: names under `transformer.`, here with
  `lm_head.weight` (tied, equal to wte) and `attn.masked_bias` buffers as some files have.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from gpt2np import GPT2Config
from gpt2np.checkpoint import random_state_dict

# The shared toy checkpoint's shape (random weights) (tests/conftest.py's `toy_folder`): GPT-2's whole vocabulary.
TOY = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=128)


def write_checkpoint(
    folder, config: GPT2Config, *, layout="openai", seed=0, std=0.02, dtype="F32", shard_count=1
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(config, seed=seed, std=std)
    if dtype == "F16":
        state = {k: v.astype(np.float16) for k, v in state.items()}
    elif dtype == "BF16":
        # Round to bfloat16 (keep the top 16 bits); stored as raw uint16 and relabelled below.
        state = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in state.items()}
    tensors = {}
    if layout == "openai":
        tensors.update(state)
        for i in range(config.n_layer):
            tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((config.n_ctx, config.n_ctx), np.float32))[None, None]
    elif layout == "transformers":
        tensors.update({f"transformer.{k}": v for k, v in state.items()})
        tensors["lm_head.weight"] = state["wte.weight"]
        for i in range(config.n_layer):
            tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    else:
        raise ValueError(layout)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    names = sorted(tensors)
    shards = [names[i::shard_count] for i in range(shard_count)]
    files = (
        ["model.safetensors"]
        if shard_count == 1
        else [f"model-{i + 1:05d}-of-{shard_count:05d}.safetensors" for i in range(shard_count)]
    )
    for file, shard in zip(files, shards):
        save_file({k: np.ascontiguousarray(tensors[k]) for k in shard}, str(folder / file), metadata={"format": "pt"})
        if dtype == "BF16":
            relabel_dtype(folder / file, "U16", "BF16")
    if shard_count > 1:
        index = {"metadata": {}, "weight_map": {k: f for f, shard in zip(files, shards) for k in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if config.vocab_size < 50257:
        write_tokenizer(folder, config.vocab_size)
    return folder


GPT2_VOCAB = Path(__file__).resolve().parents[1] / "gpt2np" / "vocab"


def write_tokenizer(folder, vocab_size: int) -> None:
    """vocab.json and merges.txt for a checkpoint whose vocabulary is smaller than GPT-2's, so that
    its config and tokenizer agree (gpt2np refuses a checkpoint whose tokenizer has ids the model
    cannot score). GPT-2's own files cut down: its first vocab_size - 1 ids, which are the 256 byte
    symbols and then one token per merge in rank order (a real BPE, the first merges), and
    <|endoftext|> last, at vocab_size - 1 (a small config's default eos and bos)."""
    folder = Path(folder)
    encoder = json.loads((GPT2_VOCAB / "encoder.json").read_text(encoding="utf-8"))
    vocab = {token: i for token, i in encoder.items() if i < vocab_size - 1}
    vocab["<|endoftext|>"] = vocab_size - 1
    lines = (GPT2_VOCAB / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = lines[1 : 1 + max(0, vocab_size - 1 - 256)]  # merge r makes token 256 + r
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([lines[0], *merges]) + "\n", encoding="utf-8")


def relabel_dtype(path: Path, old: str, new: str) -> None:
    """Rename a dtype in a safetensors header (data offsets are relative to the data, so they stay)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] == old:
            info["dtype"] = new
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


def hf_reference(folder):
    """transformers' GPT2LMHeadModel loaded from the same folder, in float32 (None if unavailable)."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return model


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.numpy()


def worst_relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the tolerance measure used throughout the parity tests."""
    return float(np.max(np.abs(ours.astype(np.float64) - ref)) / np.max(np.abs(ref)))
