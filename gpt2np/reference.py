"""GPT-2 as a textbook: the forms to read first, pinned equal to the fast code by tests.

`gpt2np/model.py` and `gpt2np/tokenizer.py` are written for speed, and speed hides some formulas:
GELU is computed as x / (1 + exp(-2u)), attention runs all heads in one product and a block of
128 queries at a time, BPE merges through a heap. This module holds the same computations in the
form of the papers, as tiktoken keeps `_educational.py` beside its fast encoder:

    gpt2(ids, params, config)   one sequence [T] -> logits [T, V]; no cache, no batch, no padding
    encode(text, encoder, bpe_ranks)   text -> ids: split, UTF-8 bytes, merge, look up

`tests/test_reference.py` checks that the fast code gives the same numbers and the same ids. The
functions here compute in the dtype they are given (float32 for the checkpoint's arrays), allocate
freely and never write into their arguments. The parameters are the nested dict `gpt2np.model`
uses, keyed by the checkpoint's names (`params["h"][0]["attn"]["c_attn"]["weight"]` is the tensor
stored as `h.0.attn.c_attn.weight`), with linear weights stored (in, out).

Shape letters used in the comments:
    T positions in the sequence    C channels (n_embd)    F MLP width (4 * n_embd)
    H heads (n_head)               D head size (C / H)    V vocabulary (vocab_size)
"""

from __future__ import annotations

import math

import numpy as np
import regex

from .tokenizer import GPT2_PATTERN, bytes_to_unicode

# ---------------------------------------------------------------------------------------- the model


def gelu(x):  # [..., F] -> [..., F]
    """The Gaussian error linear unit x Phi(x) (Hendrycks & Gimpel, 2016, "Gaussian Error Linear
    Units (GELUs)"), in the tanh approximation GPT-2 was trained with (their section 2)."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):  # [..., S] -> [..., S]
    """exp(x) / sum(exp(x)) over the last axis. Subtracting the row's maximum first changes nothing
    mathematically and keeps exp from overflowing."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x, weight, bias, eps):  # [..., C] -> [..., C]
    """Layer normalisation (Ba et al., 2016, "Layer Normalization"): each position's C channels are
    normalised to zero mean and unit variance, then scaled by `weight` and shifted by `bias`."""
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    x_hat = (x - mean) / np.sqrt(variance + eps)
    return weight * x_hat + bias


def linear(x, weight, bias):  # [..., in] @ [in, out] + [out] -> [..., out]
    """An affine map. GPT-2 stores the weight (in, out), so no transpose is needed."""
    return x @ weight + bias


def causal_mask(T, dtype):  # -> [T, T]
    """The additive mask of a decoder: 0 where query t may attend to key s (s <= t), -inf where s
    lies in t's future. Added to the scores, -inf becomes a weight of exactly 0 after softmax. It is
    built in the scores' dtype so that adding it does not promote float32 to float64."""
    return np.where(np.tri(T, dtype=bool), 0, -np.inf).astype(dtype)


def attention(q, k, v, mask, scale):  # [T, D], [T, D], [T, D], [T, T] -> [T, D]
    """Scaled dot-product attention of one head, softmax(q k^T / sqrt(D) + mask) v (Vaswani et al.,
    2017, "Attention Is All You Need", equation 1, with the decoder's mask of section 3.2.3).

    `scale` is the 1 / sqrt(D) of the formula; see `attention_scale` for the checkpoints that
    change it."""
    return softmax(q @ k.T * scale + mask) @ v


def attention_scale(config, i):
    """The factor on q k^T in block i: 1 / sqrt(D), or 1 with `config.scale_attn_weights` off; also
    divided by i + 1 with `config.scale_attn_by_inverse_layer_idx` on (as transformers does)."""
    scale = 1 / math.sqrt(config.n_embd // config.n_head) if config.scale_attn_weights else 1.0
    return scale / (i + 1) if config.scale_attn_by_inverse_layer_idx else scale


def mha(x, c_attn, c_proj, *, n_head, scale, mask):  # [T, C] -> [T, C]
    """Multi-head self-attention (Vaswani et al., 2017, section 3.2.2): one projection gives the
    queries, keys and values of every head; each head of D channels attends on its own; the heads
    are concatenated and projected back to C channels."""
    q, k, v = np.split(linear(x, **c_attn), 3, axis=-1)  # [T, 3C] -> 3 x [T, C]
    D = x.shape[-1] // n_head
    heads = []
    for h in range(n_head):
        channels = slice(h * D, (h + 1) * D)  # head h's D channels of q, k and v
        heads.append(attention(q[:, channels], k[:, channels], v[:, channels], mask, scale))  # [T, D]
    return linear(np.concatenate(heads, axis=-1), **c_proj)  # H x [T, D] -> [T, C] -> [T, C]


def ffn(x, c_fc, c_proj):  # [T, C] -> [T, C]
    """The position-wise feed-forward network (Vaswani et al., 2017, section 3.3) with GELU:
    expand to F channels, GELU, project back to C."""
    return linear(gelu(linear(x, **c_fc)), **c_proj)  # [T, C] -> [T, F] -> [T, C]


def block(x, ln_1, attn, ln_2, mlp, *, n_head, eps, scale, mask):  # [T, C] -> [T, C]
    """One transformer block with layer norm at the input of each sub-block (Radford et al., 2019,
    "Language Models are Unsupervised Multitask Learners", section 2.3): two residual additions."""
    x = x + mha(layer_norm(x, **ln_1, eps=eps), **attn, n_head=n_head, scale=scale, mask=mask)
    x = x + ffn(layer_norm(x, **ln_2, eps=eps), **mlp)
    return x


def gpt2(ids, params, config):  # [T] -> [T, V]
    """GPT-2's forward pass over one sequence of token ids (Radford et al., 2019, section 2.3):
    token plus position embeddings, n_layer blocks, a final layer norm, and logits from the token
    embedding `wte` reused as the output layer."""
    T = len(ids)
    x = params["wte"]["weight"][ids] + params["wpe"]["weight"][np.arange(T)]  # [T, C]
    mask = causal_mask(T, x.dtype)  # [T, T]
    for i, p in enumerate(params["h"]):
        x = block(
            x, **p, n_head=config.n_head, eps=config.layer_norm_epsilon, scale=attention_scale(config, i), mask=mask
        )  # [T, C]
    x = layer_norm(x, **params["ln_f"], eps=config.layer_norm_epsilon)  # [T, C]
    head = params["wte"]["weight"] if config.tie_word_embeddings else params["lm_head"]["weight"]  # [V, C]
    return x @ head.T  # [T, V]


# ------------------------------------------------------------------------------------ the tokenizer


def bpe_merge(symbols, ranks):  # n symbols -> at most n symbols
    """Byte-pair encoding of one word (Sennrich et al., 2016, "Neural Machine Translation of Rare
    Words with Subword Units", section 3.2): find the adjacent pair with the lowest merge rank,
    merge every occurrence of it, left to right, and repeat until no adjacent pair has a rank.

    `ranks` maps a pair of symbols to its rank (its line in `merges.txt`). Each pass rescans the
    whole word, so this is quadratic in its length; `gpt2np.tokenizer.Tokenizer._merge` gives the
    same result through a heap."""
    word = list(symbols)
    while len(word) > 1:
        best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def encode(text, encoder, bpe_ranks):  # str -> [n] ids
    """GPT-2's byte-level BPE (Radford et al., 2019, section 2.2) on ordinary text: the text is cut
    into words by `GPT2_PATTERN`, each word's UTF-8 bytes are written as printable characters
    (`bytes_to_unicode`: a space is 'Ġ'), merged by `bpe_merge`, and the symbols looked up.

    `encoder` maps a token's printable form to its id (`vocab.json`); `bpe_ranks` maps a pair to
    its rank (`merges.txt`); `Tokenizer().encoder` and `Tokenizer().bpe_ranks` are the bundled
    ones. Special-token text such as <|endoftext|> is encoded as ordinary text."""
    byte_encoder = bytes_to_unicode()  # byte value -> printable character
    ids = []
    for word in regex.findall(GPT2_PATTERN, text):  # "Hello world" -> ["Hello", " world"]
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]  # " world" -> ["Ġ", "w", "o", "r", "l", "d"]
        ids += [encoder[symbol] for symbol in bpe_merge(symbols, bpe_ranks)]  # ["Ġworld"] -> [995]
    return ids
