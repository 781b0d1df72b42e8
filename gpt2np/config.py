"""The model's hyperparameters, named as in the checkpoint's `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass

# "gelu_new" is GPT-2's tanh approximation of GELU; transformers also calls it "gelu_pytorch_tanh".
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

ENDOFTEXT_ID = 50256  # <|endoftext|> in GPT-2's vocabulary: the default eos_token_id and bos_token_id


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters. Defaults are GPT-2 small (124M)."""

    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # channels C of the residual stream
    n_ctx: int = 1024  # context length: the number of learned positions (`n_positions` in config.json)
    vocab_size: int = 50257
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True  # divide attention scores by sqrt(head size)
    scale_attn_by_inverse_layer_idx: bool = False  # and by (layer index + 1), as some checkpoints do
    tie_word_embeddings: bool = True  # the LM head is the token embedding `wte` (every GPT-2 checkpoint)
    # The end-of-text and beginning-of-text ids. None (not given) means GPT-2's <|endoftext|>, 50256,
    # or the last id of a vocabulary too small to hold it; after construction both are always ints.
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"):
            _check_positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None:
            _check_positive_int("n_inner", self.n_inner, " or null")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"config: activation_function {self.activation_function!r} is not supported; "
                f"gpt2np implements {' / '.join(SUPPORTED_ACTIVATIONS)} (GPT-2's tanh GELU)"
            )
        _check_epsilon(self.layer_norm_epsilon)
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("eos_token_id", "bos_token_id"):
            if getattr(self, name) is None:  # frozen: set the default through object.__setattr__
                object.__setattr__(self, name, min(ENDOFTEXT_ID, self.vocab_size - 1))
            _check_token_id(name, getattr(self, name), self.vocab_size)

    @property
    def head_size(self) -> int:
        """D: channels per head."""
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """Width of the MLP's hidden layer (3072 for GPT-2 small)."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        """Build from a transformers-style `config.json` dict (unknown keys are ignored)."""
        if not isinstance(d, dict):
            raise ValueError("config: expected a JSON object")
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config: model_type {model_type!r} is not GPT-2; gpt2np loads model_type 'gpt2' only")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in fields if k in d and (d[k] is not None or k == "n_inner")}
        # Current configs name the context `n_positions`; older ones also carry `n_ctx` (equal).
        if "n_positions" in d:
            kwargs["n_ctx"] = d["n_positions"]
        for token in ("eos_token_id", "bos_token_id"):
            if isinstance(d.get(token), list):  # some configs list several; the first is the main one
                kwargs[token] = d[token][0] if d[token] else None
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPT2Config":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the config {os.fspath(path)!r}: {e}") from e
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise ValueError(f"config {os.fspath(path)!r}: {e}") from e

    def to_dict(self) -> dict:
        """A `config.json` dict that transformers' GPT2Config also reads."""
        d = dataclasses.asdict(self)
        d["n_positions"] = d["n_ctx"]
        d["model_type"] = "gpt2"
        d["architectures"] = ["GPT2LMHeadModel"]
        return d

    @classmethod
    def preset(cls, name: str) -> "GPT2Config":
        """The shapes of the published checkpoints: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


def _check_positive_int(name: str, value, alternative: str = "") -> None:
    """bool is an int subclass, so `True` would pass as 1: reject it by name."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config: {name} must be a positive integer{alternative}, got {value!r}")


def _check_epsilon(value) -> None:
    """Layer norm divides by sqrt(variance + epsilon): a finite number above zero (not nan, inf or a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"config: layer_norm_epsilon must be a finite number > 0 (GPT-2 uses 1e-5), got {value!r}")


def _check_token_id(name: str, value, vocab_size: int) -> None:
    """A token id indexes the embedding and the logits, so it must lie in [0, vocab_size)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"config: {name} must be an integer in [0, vocab_size={vocab_size}), got {value!r}")


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),  # 82M
}
