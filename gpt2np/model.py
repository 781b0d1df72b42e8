"""The GPT-2 transformer in NumPy.

GPT-2 is the decoder-only transformer of Radford et al. (2019), "Language Models are Unsupervised
Multitask Learners", section 2.3: the GPT architecture (Radford et al., 2018) with layer norm moved
to the input of each sub-block, a final layer norm after the last block, and an LM head that reuses
the token embedding. Each block is two residual lines (Vaswani et al., 2017, "Attention Is All You
Need", for attention; Hendrycks & Gimpel, 2016, for GELU):

    x = x + mha(layer_norm(x))     # masked multi-head self-attention
    x = x + ffn(layer_norm(x))     # position-wise MLP with GELU

Names follow the checkpoint (`wte`, `wpe`, `h`, `ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`, `ln_f`), so the code can be read next to the safetensors file.

Shape letters used in the comments:
    B batch (rows)                 C channels (n_embd)         V vocabulary (vocab_size)
    T new positions in this call   H heads (n_head)            F MLP width (4 * n_embd)
    S positions attended to        D head size (C / H)
      (cached + new)

Everything stays float32: NumPy keeps float32 when an array meets a Python float, and every
constant below is applied to float32 arrays.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

# A masked attention score is set to the most negative float32: exp() of it, after the max is
# subtracted, is exactly 0, and a row whose keys are all masked (a padding query) stays finite.
MASKED = np.finfo(np.float32).min

_GELU_A = -2 * math.sqrt(2 / math.pi)  # the factor of -2u in `gelu`


def gelu(x):  # [..., F] -> [..., F]
    """GELU, GPT-2's tanh approximation: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3).

    Computed as x / (1 + exp(-2u)), the same function (0.5 (1 + tanh(u)) is the logistic sigmoid
    of 2u), because NumPy's exp is faster than its tanh and the form needs fewer passes: seven
    in-place ufuncs over one buffer instead of nine (measured 1.6x faster on the MLP's
    [1024, 3072] activation). For x below about -10, exp(-2u) overflows to inf and x / inf is
    -0.0, the correct limit; for large positive x it underflows to 0 and the result is x. Neither
    is an error.
    """
    y = x * x  # x^2
    y *= _GELU_A * 0.044715
    y += _GELU_A  # -2 sqrt(2/pi) (1 + 0.044715 x^2)
    y *= x  # -2u
    with np.errstate(over="ignore", under="ignore"):  # exp(-2u) -> inf or 0: both give the right answer
        np.exp(y, out=y)
    y += 1
    return np.divide(x, y, out=y)


def layer_norm(x, weight, bias, eps):  # [..., C] -> [..., C]
    """Normalise each position to zero mean and unit variance, then scale and shift (Ba et al., 2016)."""
    C = x.shape[-1]
    x = x - x.sum(axis=-1, keepdims=True) / C  # centre; a new array, so the residual stream is kept
    variance = np.einsum("...c,...c->...", x, x)[..., None] / C  # mean square, with no x*x temporary
    x *= 1 / np.sqrt(variance + eps)
    x *= weight
    x += bias
    return x


def linear(x, weight, bias):  # [..., in] @ [in, out] + [out] -> [..., out]
    """An affine map. Leading axes are flattened first, so the weight is read once by one matrix
    product (a stacked [B, T, in] @ [in, out] would run B separate products, reading it B times)."""
    y = x.reshape(-1, x.shape[-1]) @ weight
    y += bias
    return y.reshape(*x.shape[:-1], weight.shape[-1])


def softmax(x):  # [..., S] -> [..., S]
    """Softmax over the last axis, in place (x is a scratch array of attention scores)."""
    x -= x.max(axis=-1, keepdims=True)  # exp of a non-positive number cannot overflow
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def attention(q, k, v, mask):  # [B, H, T, D], [B, H, S, D], [B, H, S, D], [B, 1, T, S] -> [B, H, T, D]
    """Scaled dot-product attention: softmax(q k^T / sqrt(D)) v, with masked scores removed.

    `q` arrives already divided by sqrt(D) (see `mha`): scaling T x D numbers instead of T x S.
    `mask` is True where a query may attend to a key; None means every key is visible.
    """
    scores = q @ k.swapaxes(-1, -2)  # [B, H, T, S]
    if mask is not None:
        np.copyto(scores, MASKED, where=~mask)
    return softmax(scores) @ v


def causal_attention(q, k, v, mask, *, start=0, block=128):  # [B, H, T, D], [B, H, S, D] x2 -> [B, H, T, D]
    """`attention` for the queries at positions start..start+T, a block of queries at a time.

    The same numbers as one call, faster: a query never sees a later key, so the block of queries
    i..e needs only the keys up to start+e. Over a 1024-token prompt that skips the upper triangle
    of the score matrix (half the products, half the softmax) and keeps the scores block x S
    instead of T x S, small enough to stay in cache: measured 2-3x faster per layer.
    """
    T = q.shape[2]
    if T <= block:
        return attention(q, k, v, mask)
    out = np.empty(q.shape, dtype=q.dtype)
    for i in range(0, T, block):
        e = min(T, i + block)
        S = start + e  # keys this block may see
        out[:, :, i:e] = attention(q[:, :, i:e], k[:, :, :S], v[:, :, :S], None if mask is None else mask[:, :, i:e, :S])
    return out


def mha(x, c_attn, c_proj, *, n_head, scale, mask, kv_cache=None, start=0):  # [B, T, C] -> [B, T, C]
    """Masked multi-head self-attention, all heads in one matrix product.

    With a KV cache (`kv_cache` = the pair of this layer's key and value buffers [B, H, S_max, D]),
    the new keys and values are written into the buffers at positions start..start+T, and the
    queries attend to every position up to there: decoding one token costs one position's
    projections instead of the whole sequence's.
    """
    B, T, C = x.shape
    qkv = linear(x, **c_attn)  # [B, T, 3C]
    q, k, v = qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)  # 3 x [B, H, T, D]
    q *= scale  # q is a view into qkv: scale in place
    if kv_cache is not None:
        k_cache, v_cache = kv_cache  # [B, H, S_max, D] each
        k_cache[:, :, start : start + T] = k
        v_cache[:, :, start : start + T] = v
        k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]  # [B, H, S, D]
    out = causal_attention(q, k, v, mask, start=start)  # [B, H, T, D]
    out = out.transpose(0, 2, 1, 3).reshape(B, T, C)  # merge the heads back into C channels
    return linear(out, **c_proj)


def ffn(x, c_fc, c_proj):  # [B, T, C] -> [B, T, C]
    """The position-wise MLP: expand to F channels, GELU, project back to C."""
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def block(x, p, *, n_head, eps, scale, mask, kv_cache=None, start=0):  # [B, T, C] -> [B, T, C]
    """One pre-norm transformer block: two residual additions, done in place on x."""
    x += mha(layer_norm(x, **p["ln_1"], eps=eps), **p["attn"], n_head=n_head, scale=scale, mask=mask,
             kv_cache=kv_cache, start=start)  # fmt: skip
    x += ffn(layer_norm(x, **p["ln_2"], eps=eps), **p["mlp"])
    return x


def gpt2(ids, positions, params, config, *, mask=None, kv_cache=None, start=0):  # [B, T] -> [B, T, C]
    """The transformer trunk: embeddings, n_layer blocks, final layer norm.

    `positions` [B, T] indexes the learned position embeddings (per row, so left-padded rows can
    start counting at their first real token). `mask` [B, 1, T, S] says which keys each query may
    see (causal and padding); None means none is hidden, as when decoding one token with no
    padding. `kv_cache`, if given, is a list with one (keys, values) pair of [B, H, S_max, D]
    buffers per layer, and `start` is where this call's T positions go in them.
    """
    x = params["wte"]["weight"][ids] + params["wpe"]["weight"][positions]  # [B, T, C]
    scale = 1 / math.sqrt(config.n_embd // config.n_head) if config.scale_attn_weights else 1.0  # 1/sqrt(D)
    for i, p in enumerate(params["h"]):
        layer_scale = scale / (i + 1) if config.scale_attn_by_inverse_layer_idx else scale
        x = block(x, p, n_head=config.n_head, eps=config.layer_norm_epsilon, scale=layer_scale, mask=mask,
                  kv_cache=None if kv_cache is None else kv_cache[i], start=start)  # fmt: skip
    return layer_norm(x, **params["ln_f"], eps=config.layer_norm_epsilon)


def lm_head(x, wte):  # [..., C] -> [..., V]
    """Logits: the final hidden states times the token embedding (weights tied, as in GPT-2)."""
    return (x.reshape(-1, x.shape[-1]) @ wte.T).reshape(*x.shape[:-1], wte.shape[0])


def causal_mask(key_valid, start, T):  # [B, S] -> [B, 1, T, S]
    """Which keys each of the T new queries may attend to: earlier-or-same positions that are not
    padding. `key_valid[b, s]` is False where position s of row b is left padding."""
    S = key_valid.shape[1]
    causal = np.arange(S)[None, :] <= np.arange(start, start + T)[:, None]  # [T, S]
    return (causal[None, :, :] & key_valid[:, None, :])[:, None]


class GPT2:
    """A GPT-2 checkpoint ready to run: `model(ids)` gives logits, `model.generate(...)` text.

    Load one with `GPT2.from_pretrained("gpt2")` (a hub name, downloaded once into the hub's cache)
    or `GPT2.from_pretrained("path/to/folder")` (a folder with config.json + model.safetensors).
    """

    def __init__(self, config, params, tokenizer=None, *, name=None):
        from .tokenizer import Tokenizer

        self.config = config
        self.params = params  # nested dict of float32 arrays, keyed by the checkpoint's names
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        self.name = name

    @classmethod
    def from_pretrained(cls, name_or_path, *, revision="main", cache_dir=None, token=None, offline=None,
                        progress=True) -> "GPT2":  # fmt: skip
        """Load a checkpoint folder, or a hub repo (`gpt2`, `openai-community/gpt2-medium`, ...).

        A folder is used as it is. Otherwise the name is a hub repo id (short names `gpt2`,
        `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2` are mapped to their repos), fetched
        into the HuggingFace cache unless already there; see `gpt2np.hub.snapshot_download`.
        """
        from pathlib import Path

        from .checkpoint import CONFIG_NAME, load_state_dict, unflatten
        from .config import GPT2Config
        from .tokenizer import Tokenizer

        folder = Path(name_or_path)
        if not folder.is_dir():
            text = str(name_or_path)
            if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
                raise ValueError(f"no checkpoint folder at {text!r}: pass an existing folder or a hub repo id like 'gpt2'")
            from .hub import snapshot_download

            folder = snapshot_download(text, revision=revision, cache_dir=cache_dir, token=token,
                                       offline=offline, progress=progress)  # fmt: skip
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(f"no {CONFIG_NAME} in {folder}: a checkpoint folder holds config.json and model.safetensors")
        config = GPT2Config.from_json_file(folder / CONFIG_NAME)
        params = unflatten(load_state_dict(folder, config))
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        tokenizer = Tokenizer.from_files(vocab, merges) if vocab.is_file() and merges.is_file() else Tokenizer()
        return cls(config, params, tokenizer, name=str(name_or_path))

    @classmethod
    def from_random(cls, config, *, seed=0, std=0.02) -> "GPT2":
        """A randomly initialised model of the given config (for tests and benchmarks)."""
        from .checkpoint import random_state_dict, unflatten

        return cls(config, unflatten(random_state_dict(config, seed=seed, std=std)), name="random")

    @property
    def lm_head_weight(self):  # [V, C]
        return self.params["wte"]["weight"] if self.config.tie_word_embeddings else self.params["lm_head"]["weight"]

    def check_ids(self, ids) -> np.ndarray:
        """Token ids as an int array [T] or [B, T], or a ValueError that says what is wrong."""
        try:
            ids = np.asarray(ids)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"ids must be a rectangular [T] or [B, T] array of token ids ({e}); pad ragged rows or use generate_ids") from None
        if ids.dtype == bool or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ValueError(f"ids must be integer token ids, got dtype {ids.dtype}")
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0 or ids.size == 0:
            raise ValueError(f"ids must have shape [T] or [B, T] with T >= 1, got shape {ids.shape}")
        if ids.shape[-1] > self.config.n_ctx:
            raise ValueError(f"sequence of {ids.shape[-1]} tokens is longer than the context ({self.config.n_ctx} tokens)")
        V = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            bad = ids[(ids < 0) | (ids >= V)]
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {V})")
        return ids.astype(np.intp, copy=False)

    def __call__(self, ids) -> np.ndarray:  # [T] -> [T, V]  or  [B, T] -> [B, T, V]
        """Logits for every position of `ids` (float32)."""
        ids = self.check_ids(ids)
        batch = ids if ids.ndim == 2 else ids[None]  # [B, T]
        B, T = batch.shape
        positions = np.broadcast_to(np.arange(T), (B, T))
        mask = causal_mask(np.ones((B, T), dtype=bool), 0, T)
        x = gpt2(batch, positions, self.params, self.config, mask=mask)  # [B, T, C]
        logits = lm_head(x, self.lm_head_weight)  # [B, T, V]
        return logits if ids.ndim == 2 else logits[0]

    def __repr__(self) -> str:
        c = self.config
        return f"GPT2({self.name!r}, n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, n_ctx={c.n_ctx})"

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_or_prompts, *, max_new_tokens=50, do_sample=True, temperature=0.8, top_p=1.0,
                 top_k=None, repetition_penalty=1.0, return_full_text=True, stop=None, seed=None,
                 ignore_eos=False):  # fmt: skip
        """Continue a prompt (str -> str) or several (list -> list, same order).

        Defaults mirror the GPT-2 model card's endpoint: sampling at temperature 0.8, top_p 1.0.
        `top_k` is off unless given (transformers silently uses 50 when sampling).
        `do_sample=False` is greedy and ignores temperature / top_k / top_p. A row ends at EOS,
        after `max_new_tokens`, or at the first of the `stop` strings (cut from the text).
        `return_full_text=True` returns the prompt verbatim followed by the continuation.
        `seed` makes the call reproducible; row i of a batch draws from the seed's i-th child, so
        a prompt gives the same text alone or in a batch. An empty prompt is conditioned on
        <|endoftext|>.
        """
        from .generation import GenerationOptions, check_prompts, generate_text, row_generators

        prompts, single = check_prompts(prompt_or_prompts)
        _check_bool("return_full_text", return_full_text)
        options = GenerationOptions.make(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                         top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, stop=stop,
                                         ignore_eos=ignore_eos)  # fmt: skip
        texts = generate_text(self, prompts, options, row_generators(seed, len(prompts)), return_full_text=return_full_text)
        return texts[0] if single else texts

    def generate_ids(self, prompts, *, max_new_tokens=50, do_sample=True, temperature=0.8, top_p=1.0, top_k=None,
                     repetition_penalty=1.0, stop=None, seed=None, ignore_eos=False) -> list[list[int]]:  # fmt: skip
        """Like `generate`, on token ids: a list of id lists in, the new ids of each out (EOS not included;
        with `stop`, up to and including the token that completed the stop string)."""
        from .generation import GenerationOptions, generate_ids, row_generators

        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError("generate_ids takes a non-empty list of token-id lists, e.g. [[464, 3290]]")
        if all(isinstance(p, numbers.Integral) for p in prompts):
            raise TypeError("generate_ids takes a list of token-id lists: wrap a single prompt as [ids]")
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple, np.ndarray)) or len(p) == 0:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {p!r}")
        options = GenerationOptions.make(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                         top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, stop=stop,
                                         ignore_eos=ignore_eos)  # fmt: skip
        return generate_ids(self, [[int(t) for t in p] for p in prompts], options, row_generators(seed, len(prompts)))

    def stream(self, prompt, *, max_new_tokens=50, do_sample=True, temperature=0.8, top_p=1.0, top_k=None,
               repetition_penalty=1.0, return_full_text=True, stop=None, seed=None, ignore_eos=False):  # fmt: skip
        """Yield the text of `generate(prompt, ...)` in pieces as it is decided (same options).
        A character split across tokens is held back until complete; so is text that a stop string
        could still remove. The pieces join to exactly what `generate` returns for the same seed."""
        from .generation import GenerationOptions, row_generators, stream_text

        if not isinstance(prompt, str):
            raise TypeError(f"stream takes one prompt string, got {type(prompt).__name__}")
        _check_bool("return_full_text", return_full_text)
        options = GenerationOptions.make(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                         top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, stop=stop,
                                         ignore_eos=ignore_eos)  # fmt: skip
        return stream_text(self, prompt, options, row_generators(seed, 1)[0], return_full_text=return_full_text)


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
