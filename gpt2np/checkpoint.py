"""Reading GPT-2 weights from safetensors files, checked against the config before use.

A checkpoint folder holds `config.json` and either `model.safetensors` or a sharded set
(`model.safetensors.index.json` naming `model-0000N-of-0000M.safetensors` files). Tensor names
are the checkpoint's own (`wte.weight`, `h.0.attn.c_attn.weight`, ...), with or without the
`transformer.` prefix that current transformers writes. Linear weights are stored (in, out), as
GPT-2's original TensorFlow code and transformers' `Conv1D` keep them, so `x @ weight` needs no
transpose.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from .config import GPT2Config

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# The causal-mask buffers that older checkpoints store as tensors: `h.N.attn.bias` [1, 1, n_ctx, n_ctx]
# and `h.N.attn.masked_bias`. They are not weights. Note `h.N.attn.c_attn.bias` is a weight and must
# not match, hence the anchored pattern.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every weight a GPT-2 checkpoint must hold, by its name in the checkpoint, with its shape."""
    C, F, V = config.n_embd, config.mlp_width, config.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (config.n_ctx, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(config.n_layer):
        shapes |= {
            f"h.{i}.ln_1.weight": (C,),
            f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C),
            f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C),
            f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,),
            f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, F),
            f"h.{i}.mlp.c_fc.bias": (F,),
            f"h.{i}.mlp.c_proj.weight": (F, C),
            f"h.{i}.mlp.c_proj.bias": (C,),
        }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder: the single file, or every shard of the index."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (expected a 'weight_map' object): {e}") from e
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
        return [folder / s for s in shards]
    found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.h5"))
    hint = f" (found {', '.join(found)}: gpt2np reads safetensors only)" if found else ""
    raise ValueError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {folder}{hint}")


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON) and where data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


# safetensors dtype -> the NumPy dtype its bytes are read as. BF16 has no NumPy dtype: it is the top
# half of a float32, so its 16 bits are read as uint16 and shifted up by 16 (see `_to_float32`).
_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def read_safetensors(path: Path, *, column_major=()) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as float32 NumPy arrays (F32 / F16 / BF16 / F64).

    The safetensors package validates the file first (header, dtypes, offsets that tile the
    data exactly, file size). The bytes are then read straight into their arrays rather than
    through a memory map: a map's pages would count in the process's memory beside the arrays,
    doubling the peak while loading. The 2-D tensors named in `column_major` (with or without the
    `transformer.` prefix) are stored column-major (Fortran order), read a block of rows at a time
    so that the file's row-major copy is never whole in memory beside it.
    """
    try:
        with safe_open(path, framework="np") as f:  # raises on a malformed or truncated file
            names = list(f.keys())
        header, data_start = _header(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e}); re-download or re-save it") from e
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    tensors = {}
    with open(path, "rb") as f:
        for name in names:
            info = header[name]
            if _BUFFER.fullmatch(name.removeprefix("transformer.")):
                tensors[name] = None  # a mask buffer (often BOOL or U8): dropped by the caller, never read
                continue
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; expected F32, F16 or BF16")
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            dtype = np.dtype(_DTYPES[info["dtype"]])
            if name.removeprefix("transformer.") in column_major and len(info["shape"]) == 2:
                rows, columns = info["shape"]
                tensor = np.empty((rows, columns), dtype=np.float32, order="F")
                for r in range(0, rows, 4096):
                    n = min(4096, rows - r)
                    tensor[r : r + n] = _to_float32(
                        np.fromfile(f, dtype=dtype, count=n * columns), info["dtype"]
                    ).reshape(n, columns)
                tensors[name] = tensor
                continue
            raw = np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize)
            tensors[name] = _to_float32(raw, info["dtype"]).reshape(info["shape"])
    return tensors


def load_state_dict(folder: str | os.PathLike, config: GPT2Config, *, column_major=()) -> dict[str, np.ndarray]:
    """Read and check every weight of a checkpoint folder; names come back without `transformer.`;
    those in `column_major` are stored so (see `read_safetensors`).

    Raises ValueError naming each missing, unexpected or misshapen tensor.
    """
    state: dict[str, np.ndarray] = {}
    for path in weight_files(folder):
        for name, tensor in read_safetensors(path, column_major=column_major).items():
            name = name.removeprefix("transformer.")
            if _BUFFER.fullmatch(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue  # mask buffers, and the tied head (the same numbers as wte)
            if name in state:
                raise ValueError(f"tensor {name!r} appears twice in {folder}")
            state[name] = tensor
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state), key=_natural)
    unexpected = sorted(set(state) - set(expected), key=_natural)
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in sorted(set(expected) & set(state), key=_natural)
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shapes: {', '.join(wrong[:8])}")
    if problems:
        raise ValueError(f"checkpoint {folder} does not match its config.json: " + "; ".join(problems))
    return state


def check_tokenizer(config: GPT2Config, tokenizer: Tokenizer) -> None:
    """Check at load that a checkpoint's config and its tokenizer agree, so generation cannot fail midway.

    The model scores ids [0, vocab_size): each tokenizer id needs a row there, or a prompt's id
    indexes past the embedding. A larger vocab_size is accepted (padded vocabularies such as 50304):
    the extra rows belong to no token, and the decoding engine samples only the tokenizer's ids.
    eos_token_id ends generation and bos_token_id conditions an empty prompt, so both must be
    tokens the tokenizer can decode. Raises ValueError naming the numbers that disagree.
    """
    if config.vocab_size < tokenizer.n_vocab:
        raise ValueError(
            f"config.json has vocab_size {config.vocab_size} but the tokenizer has {tokenizer.n_vocab} tokens, so the "
            f"model cannot score or produce ids {config.vocab_size}..{tokenizer.n_vocab - 1}: the checkpoint's "
            f"tokenizer files (vocab.json/merges.txt) do not match its config (without them the bundled GPT-2 "
            f"tokenizer is used)"
        )
    tokens = set(tokenizer.encoder.values())  # not range(n_vocab): a vocabulary may leave ids unused
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    for name in ("eos_token_id", "bos_token_id"):
        token = getattr(config, name)
        if token not in tokens:
            raise ValueError(
                f"config.json's {name} {token} is not a token of the tokenizer ({tokenizer.n_vocab} ids"
                f"{'' if eot is None else f', <|endoftext|> = {eot}'}): set {name} in config.json to one of its ids, "
                f"or ship the tokenizer files (vocab.json/merges.txt) that match the config"
            )


def _natural(name: str):
    """Sort h.2 before h.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def unflatten(state: dict[str, np.ndarray]) -> dict:
    """`{"h.0.attn.c_attn.weight": w}` -> `{"h": [{"attn": {"c_attn": {"weight": w}}}]}`.

    The nested dict keeps the checkpoint's names, so `params["h"][0]["attn"]["c_attn"]["weight"]`
    is the tensor stored as `h.0.attn.c_attn.weight`.
    """
    params: dict = {}
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = tensor
    params["h"] = [params["h"][str(i)] for i in range(len(params["h"]))]
    return params


def save_checkpoint(folder: str | os.PathLike, config: GPT2Config, state: dict[str, np.ndarray]) -> None:
    """Write `config.json` + `model.safetensors` in the hub's layout (used by tests and benchmarks)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))
    save_file(
        {k: np.ascontiguousarray(v) for k, v in state.items()}, str(folder / WEIGHTS_NAME), metadata={"format": "pt"}
    )


def random_state_dict(config: GPT2Config, *, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """A randomly initialised GPT-2 (normal weights, unit layer norms), for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            state[name] = 1 + np.float32(0.1) * rng.standard_normal(shape, dtype=np.float32)
        else:
            state[name] = np.float32(std) * rng.standard_normal(shape, dtype=np.float32)
    return state
