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

Read gpt2np/reference.py first: the same model in its textbook form (GELU as the tanh formula,
attention per head as softmax(q k^T / sqrt(D) + mask) v, one sequence, no cache). This module is
the fast form of each step; tests/test_reference.py pins the two equal. Where a fast form hides
the formula, the docstring names the reference function to read.

Everything stays float32: NumPy keeps float32 when an array meets a Python float, and every
constant below is applied to float32 arrays.

Execution is not this module's business: every function takes arrays and returns arrays, on the
calling thread. How a long pass is split over threads (products by bands of output columns,
attention by heads and blocks of queries, layer norms by positions) is gpt2np.threads', which calls
these same functions on the parts; the engine decides which pass runs where.
"""

from __future__ import annotations

import math

import numpy as np

# A masked attention score is set to the most negative float32: exp() of it, after the max is
# subtracted, is exactly 0, and a row whose keys are all masked (a padding query) stays finite.
MASKED = np.finfo(np.float32).min

_GELU_A = -2 * math.sqrt(2 / math.pi)  # the factor of -2u in `gelu`


def gelu(x, out=None):  # [..., F] -> [..., F]
    """GELU, GPT-2's tanh approximation: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3).

    Computed as x / (1 + exp(-2u)), the same function (0.5 (1 + tanh(u)) is the logistic sigmoid
    of 2u), because NumPy's exp is faster than its tanh and the form needs fewer passes: seven
    in-place ufuncs over one buffer instead of nine (measured 1.6x faster on the MLP's
    [1024, 3072] activation). For x below about -10, exp(-2u) overflows to inf and x / inf is
    -0.0, the correct limit; for large positive x it underflows to 0 and the result is x. Neither
    is an error. The formula as written: `reference.gelu`. `out` may be x itself.
    """
    y = x * x  # x^2
    y *= _GELU_A * 0.044715
    y += _GELU_A  # -2 sqrt(2/pi) (1 + 0.044715 x^2)
    y *= x  # -2u
    with np.errstate(over="ignore", under="ignore"):  # exp(-2u) -> inf or 0: both give the right answer
        np.exp(y, out=y)
    y += 1
    return np.divide(x, y, out=y if out is None else out)


def layer_norm(x, weight, bias, eps, out=None):  # [..., C] -> [..., C]
    """Normalise each position to zero mean and unit variance, then scale and shift (Ba et al., 2016)."""
    C = x.shape[-1]
    x = np.subtract(x, x.sum(axis=-1, keepdims=True) / C, out=out)  # centre; x itself (the residual) is kept
    variance = np.einsum("...c,...c->...", x, x)[..., None] / C  # mean square, with no x*x temporary
    x *= 1 / np.sqrt(variance + eps)
    x *= weight
    x += bias
    return x


def linear(x, weight, bias, *, activation=None, out=None):  # [..., in] @ [in, out] + [out] -> [..., out]
    """An affine map, then `activation` if given (applied in place). Leading axes are flattened
    first, so the weight is read once by one matrix product (a stacked [B, T, in] @ [in, out] would
    run B separate products, reading it B times). `out` [N, out], if given, receives the result."""
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    y = np.matmul(x2, weight, out=out)
    y += bias
    if activation is not None:
        activation(y, out=y)
    return y.reshape(*x.shape[:-1], y.shape[1])


def softmax(x):  # [..., S] -> [..., S]
    """Softmax over the last axis, in place (x is a scratch array of attention scores); `reference.softmax`
    is the same without the in-place steps."""
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
    instead of T x S, small enough to stay in cache: measured 2-3x faster per layer. One head at a
    time, with the mask added to the scores: `reference.attention`.
    """
    B, H, T, D = q.shape
    if T <= block:
        return attention(q, k, v, mask)
    out = np.empty((B, T, H, D), dtype=q.dtype).transpose(0, 2, 1, 3)  # [B, H, T, D], stored as `mha` merges it
    for i in range(0, T, block):
        e = min(T, i + block)
        out[:, :, i:e] = attention(
            q[:, :, i:e], k[:, :, : start + e], v[:, :, : start + e], key_mask(mask, i, e, start)
        )
    return out


def key_mask(mask, i, e, start):  # [B, 1, T, S] -> [B, 1, e - i, start + e]
    """The mask of the queries i..e, over the keys they may see (None stays None)."""
    return None if mask is None else mask[:, :, i:e, : start + e]


def mha(x, c_attn, c_proj, *, n_head, scale, mask, kv_cache=None, start=0):  # [B, T, C] -> [B, T, C]
    """Masked multi-head self-attention, all heads in one matrix product (`reference.mha` loops over them).

    With a KV cache (`kv_cache` = the pair of this layer's key and value buffers [B, H, S_max, D]),
    the new keys and values are written into the buffers at positions start..start+T, and the
    queries attend to every position up to there: decoding one token costs one position's
    projections instead of the whole sequence's.
    """
    q, k, v = split_heads(linear(x, **c_attn), n_head)  # 3 x [B, H, T, D]
    q *= scale  # q is a view into the projection: scale in place
    k, v = remember(kv_cache, k, v, start)  # [B, H, S, D] each
    return linear(merge_heads(causal_attention(q, k, v, mask, start=start)), **c_proj)


def split_heads(qkv, n_head):  # [B, T, 3C] -> 3 x [B, H, T, D]
    """The queries, keys and values of every head: views into the projection, no copy."""
    B, T, C3 = qkv.shape
    return qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)


def merge_heads(z):  # [B, H, T, D] -> [B, T, C]
    """The heads' outputs side by side in C channels (a copy, unless `z` is stored that way)."""
    B, H, T, D = z.shape
    return z.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def remember(kv_cache, k, v, start):  # [B, H, T, D] x2 -> [B, H, S, D] x2
    """With a KV cache, write the new keys and values at its columns start..start+T and return
    every column up to there; without one, the new keys and values are all there is."""
    if kv_cache is None:
        return k, v
    k_cache, v_cache = kv_cache  # [B, H, S_max, D] each
    T = k.shape[2]
    k_cache[:, :, start : start + T] = k
    v_cache[:, :, start : start + T] = v
    return k_cache[:, :, : start + T], v_cache[:, :, : start + T]


def ffn(x, c_fc, c_proj):  # [B, T, C] -> [B, T, C]
    """The position-wise MLP: expand to F channels, GELU, project back to C."""
    return linear(linear(x, **c_fc, activation=gelu), **c_proj)


def block(x, p, *, n_head, eps, scale, mask, kv_cache=None, start=0):  # [B, T, C] -> [B, T, C]
    """One pre-norm transformer block: two residual additions, done in place on x."""
    x += mha(
        layer_norm(x, **p["ln_1"], eps=eps),
        **p["attn"],
        n_head=n_head,
        scale=scale,
        mask=mask,
        kv_cache=kv_cache,
        start=start,
    )
    x += ffn(layer_norm(x, **p["ln_2"], eps=eps), **p["mlp"])
    return x


def attention_scale(config, layer: int) -> float:
    """What `mha` multiplies the queries by: 1/sqrt(D), and 1/(layer + 1) too where the config says so."""
    scale = 1 / math.sqrt(config.n_embd // config.n_head) if config.scale_attn_weights else 1.0
    return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale


def embed(ids, positions, params):  # [B, T], [B, T] -> [B, T, C]
    """Token embedding plus learned position embedding."""
    return params["wte"]["weight"][ids] + params["wpe"]["weight"][positions]


def gpt2(ids, positions, params, config, *, mask=None, kv_cache=None, start=0):  # [B, T] -> [B, T, C]
    """The transformer trunk: embeddings, n_layer blocks, final layer norm.

    `positions` [B, T] indexes the learned position embeddings (per row, so left-padded rows can
    start counting at their first real token). `mask` [B, 1, T, S] says which keys each query may
    see (causal and padding); None means none is hidden, as when decoding one token with no
    padding. `kv_cache`, if given, is a list with one (keys, values) pair of [B, H, S_max, D]
    buffers per layer, and `start` is where this call's T positions go in them.
    """
    x = embed(ids, positions, params)  # [B, T, C]
    for i, p in enumerate(params["h"]):
        x = block(
            x,
            p,
            n_head=config.n_head,
            eps=config.layer_norm_epsilon,
            scale=attention_scale(config, i),
            mask=mask,
            kv_cache=None if kv_cache is None else kv_cache[i],
            start=start,
        )
    return layer_norm(x, **params["ln_f"], eps=config.layer_norm_epsilon)


def lm_head(x, wte, out=None):  # [..., C] -> [..., V]
    """Logits: the final hidden states times the token embedding (weights tied, as in GPT-2).
    `out` [N, V], if given, receives them."""
    x2 = x.reshape(-1, x.shape[-1])  # [N, C]
    return np.matmul(x2, wte.T, out=out).reshape(*x.shape[:-1], wte.shape[0])


def causal_mask(key_valid, start, T):  # [B, S] -> [B, 1, T, S]
    """Which keys each of the T new queries may attend to: earlier-or-same positions that are not
    padding. `key_valid[b, s]` is False where position s of row b is left padding."""
    S = key_valid.shape[1]
    causal = np.arange(S)[None, :] <= np.arange(start, start + T)[:, None]  # [T, S]
    return (causal[None, :, :] & key_valid[:, None, :])[:, None]
