"""How a forward pass is executed: gpt2np.model says what is computed, this module on which threads.

A long pass (a prompt's prefill, scoring) runs on the model's pool (gpt2np.threads) with every step
cut into parts: the products by bands of output columns, attention by (head group, query block),
layer norms by bands of positions, the LM head by bands of the vocabulary. Each part is a call of
gpt2np.model's own function on a part of the arrays, writing its own part of an output allocated
beforehand: the split is decided here, the arithmetic stays model.py's (BLAS may round a product
differently once it is cut, about 1e-7 relative). `gpt2` below takes the same steps in the same
order as model.gpt2 / block / mha / ffn; tests/test_threads.py pins the two equal. A short pass
(every decoding step) runs model.gpt2 itself: `pool` None.
"""

from __future__ import annotations

import numpy as np

from . import model

# The LM head multiplies the last hidden state by the token embedding's transpose: a vector-matrix
# product over a [V, C] matrix. OpenBLAS reads it faster when the matrix is stored column-major
# ([C, V] in memory, so that wte.T is the contiguous one): measured on gpt2's 50,257 x 768,
# 5.8 -> 4.4 ms a step at batch 1, 17.7 -> 11.9 ms at batch 8, the same numbers. The embedding
# lookup, a row per token, barely notices. So the model keeps these tensors that way (the loader
# reads them so, never holding a second copy: gpt2np.checkpoint.read_safetensors' `column_major`).
COLUMN_MAJOR = ("wte.weight", "lm_head.weight")


def parallel(pool, fn, items) -> None:
    """Call fn(item) for each item: in order on this thread when `pool` is None, else spread over
    the pool's threads. Each item writes only its own part of an output allocated beforehand, so no
    two threads touch the same numbers."""
    if pool is None:
        for item in items:
            fn(item)
    else:
        pool.map(fn, items)


def pieces(n, pool, *, multiple=1) -> list[slice]:  # -> list of slices covering range(n)
    """range(n) whole when `pool` is None, else cut into one near-equal piece per thread, each cut
    at a multiple of `multiple` (the product kernels' column widths divide 64)."""
    if pool is None:
        return [slice(0, n)]
    units = -(-n // multiple)
    parts = min(pool.n, units)
    cuts = [min(n, (units * i // parts) * multiple) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


# The trunk on a pool: gpt2np.model's functions, each step split into parts. The same steps in the
# same order as model.gpt2 / block / mha / ffn (read those for the formulas).
def linear(pool, x, weight, bias, *, activation=None):  # [..., in] -> [..., out]
    """model.linear by bands of output columns, the activation applied while the band is in cache."""
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    y = np.empty((x2.shape[0], weight.shape[-1]), dtype=np.float32)  # [N, out]

    def columns(j):
        model.linear(x2, weight[:, j], bias[j], activation=activation, out=y[:, j])

    parallel(pool, columns, pieces(y.shape[1], pool, multiple=64))
    return y.reshape(*x.shape[:-1], y.shape[1])


def layer_norm(pool, x, weight, bias, eps):  # [B, T, C] -> [B, T, C]
    """model.layer_norm into a new array, one band of positions per thread."""
    x2, out = x.reshape(-1, x.shape[-1]), np.empty(x.shape, dtype=np.float32)
    out2 = out.reshape(x2.shape)
    parallel(pool, lambda r: model.layer_norm(x2[r], weight, bias, eps, out=out2[r]), pieces(len(x2), pool))
    return out


def causal_attention(pool, q, k, v, mask, *, start=0, block=128):  # [B, H, T, D], [B, H, S, D] x2 -> [B, H, T, D]
    """model.causal_attention by (head group, query block), the longest blocks first."""
    B, H, T, D = q.shape
    out = np.empty((B, T, H, D), dtype=q.dtype).transpose(0, 2, 1, 3)  # [B, H, T, D], stored as merge_heads reads it

    def one(item):  # heads h, queries i..e
        h, i, e = item
        S = start + e
        out[:, h, i:e] = model.attention(q[:, h, i:e], k[:, h, :S], v[:, h, :S], model.key_mask(mask, i, e, start))

    blocks = [(i, min(T, i + block)) for i in range(0, T, block)]
    parallel(pool, one, [(h, i, e) for i, e in reversed(blocks) for h in pieces(H, pool)])
    return out


def gpt2(pool, ids, positions, params, config, *, mask=None, kv_cache=None, start=0):  # [B, T] -> [B, T, C]
    """model.gpt2 with every step split over the pool."""
    eps = config.layer_norm_epsilon
    x = model.embed(ids, positions, params)  # [B, T, C]
    for i, p in enumerate(params["h"]):
        attn, mlp = p["attn"], p["mlp"]
        q, k, v = model.split_heads(
            linear(pool, layer_norm(pool, x, **p["ln_1"], eps=eps), **attn["c_attn"]), config.n_head
        )
        q *= model.attention_scale(config, i)
        k, v = model.remember(None if kv_cache is None else kv_cache[i], k, v, start)
        x += linear(pool, model.merge_heads(causal_attention(pool, q, k, v, mask, start=start)), **attn["c_proj"])
        h = linear(pool, layer_norm(pool, x, **p["ln_2"], eps=eps), **mlp["c_fc"], activation=model.gelu)
        x += linear(pool, h, **mlp["c_proj"])
    return layer_norm(pool, x, **params["ln_f"], eps=eps)


def lm_head(pool, x, wte):  # [..., C] -> [..., V]
    """model.lm_head by bands of the vocabulary."""
    x2 = x.reshape(-1, x.shape[-1])  # [N, C]
    y = np.empty((x2.shape[0], wte.shape[0]), dtype=np.float32)  # [N, V]
    parallel(pool, lambda j: model.lm_head(x2, wte[j], out=y[:, j]), pieces(wte.shape[0], pool, multiple=64))
    return y.reshape(*x.shape[:-1], wte.shape[0])
