"""Text generation: a KV-cached decoding loop over a batch of prompts, the sampler, stop strings
and streaming.

The semantics follow HuggingFace transformers' `generate`: logits processors first
(`repetition_penalty`), then, when sampling, the warpers in the order temperature -> top_k -> top_p,
then a draw from the softmax. Unlike transformers, `top_k` is off unless asked (transformers
silently applies top_k=50 when sampling).

Prompts of different lengths are left-padded into one batch: each row carries its own positions
(counting from its first real token) and a mask hiding its padding, so every row produces what it
would produce alone. Rows that finish are dropped from the batch (and from the KV cache), so they
stop costing work.
"""

from __future__ import annotations

import codecs
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .model import causal_mask, gpt2, lm_head


# ---------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class GenerationOptions:
    """Every generation option, validated. The defaults mirror the GPT-2 model card's endpoint."""

    max_new_tokens: int = 50
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        def number(name, value, *, integer=False):
            kind = numbers.Integral if integer else numbers.Real
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
            if not integer and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")

        number("max_new_tokens", self.max_new_tokens, integer=True)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for flag in ("do_sample", "ignore_eos"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        number("temperature", self.temperature)
        number("top_p", self.top_p)
        number("repetition_penalty", self.repetition_penalty)
        if self.top_k is not None:
            number("top_k", self.top_k, integer=True)
            if self.top_k < 1:
                raise ValueError(f"top_k must be >= 1 (or None to turn it off), got {self.top_k}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature}; "
                "for deterministic output use do_sample=False (greedy)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1.0 turns it off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 turns it off), got {self.repetition_penalty}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise TypeError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @classmethod
    def make(cls, *, stop=None, **kwargs) -> "GenerationOptions":
        """Build from keyword arguments as users pass them (`stop` may be a string, a list or None)."""
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise TypeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        return cls(stop=stop, **kwargs)


def row_generators(seed, n: int) -> list[np.random.Generator]:
    """One random generator per row, all derived from `seed` (None: fresh entropy).

    Row i of a batch gets the i-th child of the seed, so a prompt's samples do not depend on how
    many other prompts share its call: generate(["a", "b"], seed=1)[0] == generate("a", seed=1).
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(n)]


# ---------------------------------------------------------------------------------------- sampler
def apply_repetition_penalty(logits, seen, penalty):  # [V], [V] bool -> [V]
    """CTRL's penalty (Keskar et al., 2019), as transformers applies it: for tokens already in the
    prompt or output, divide a positive logit by `penalty` and multiply a negative one."""
    scores = logits[seen]
    logits[seen] = np.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def top_k_keep(logits, k):  # [V] -> [V] bool
    """Keep the k largest logits; ties with the k-th largest are kept too (as transformers does)."""
    if k >= logits.shape[-1]:
        return np.ones(logits.shape, dtype=bool)
    kth = np.partition(logits, logits.shape[-1] - k)[logits.shape[-1] - k]
    return logits >= kth


def top_p_keep(logits, top_p, candidates=None):  # [V] -> [V] bool
    """Nucleus filtering (Holtzman et al., 2019): keep the most likely tokens, in order, until their
    probability mass reaches top_p; the token that crosses the threshold is kept, and so is at
    least one token.

    Sorting 50,257 logits every step is the slow way. The nucleus is almost always small, so first
    `argpartition` pulls out the largest few and sorts only those; if they do not reach top_p, try
    eight times more. `candidates` (bool [V]) restricts the choice (the output of top_k): the
    nucleus is then taken among those few tokens alone.
    """
    V = logits.shape[-1]
    if candidates is not None:
        ids = np.flatnonzero(candidates)
        keep = np.zeros(V, dtype=bool)
        keep[ids[top_p_keep(logits[ids], top_p)]] = True
        return keep
    w = logits - logits.max()
    np.exp(w, out=w)  # float32 unnormalised probabilities, summed in float64 below
    total = np.add.reduce(w, dtype=np.float64)
    k = min(V, 256)
    while True:
        best = np.argpartition(-logits, k - 1)[:k] if k < V else np.arange(V)
        best = best[np.lexsort((best, -logits[best]))]  # most likely first; equal logits by id
        mass = np.cumsum(w[best], dtype=np.float64) / total
        if mass[-1] >= top_p or k == V:
            break
        k = min(V, k * 8)
    # Token i is kept when the mass of the tokens before it is below top_p.
    n_keep = min(int(np.searchsorted(mass, top_p, side="left")) + 1, k)
    keep = np.zeros(V, dtype=bool)
    keep[best[:n_keep]] = True
    return keep


def warp(logits, options: GenerationOptions):  # [V] -> [V] bool, or None for "every token"
    """The sampling warpers in transformers' order: temperature (in place), then top_k, then top_p.
    Returns which tokens may still be drawn."""
    logits /= np.float32(options.temperature)
    keep = None
    if options.top_k is not None:
        keep = top_k_keep(logits, options.top_k)
    if options.top_p < 1.0:
        keep = top_p_keep(logits, options.top_p, keep)
    return keep


def next_token(logits, options: GenerationOptions, rng: np.random.Generator, seen=None) -> int:  # [V] -> id
    """Choose the next token from one row's logits (a scratch float32 array, changed in place)."""
    if options.repetition_penalty != 1.0 and seen is not None:
        apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if not options.do_sample:
        return int(np.argmax(logits))
    keep = warp(logits, options)
    ids = None if keep is None else np.flatnonzero(keep)  # the tokens that may be drawn
    i = draw(logits if ids is None else logits[ids], rng)
    return i if ids is None else int(ids[i])


def draw(z, rng: np.random.Generator, *, block: int = 1024) -> int:  # [N] logits -> index
    """Draw index i with probability softmax(z)_i: inverse-CDF sampling with one uniform number.

    The weights exp(z - max) are computed in float32 and summed in float64. A cumulative sum over
    the whole vocabulary is slow in NumPy (one element at a time: 0.2 ms for 50,257, and exp in
    float64 costs 0.45 ms more), so the CDF is walked in two levels: the sums of blocks of
    `block` weights first, then the running sum inside the one block the draw falls in. Same
    draw as the full CDF, about 7x faster.
    """
    w = z - z.max()
    np.exp(w, out=w)  # [N] float32, unnormalised probabilities; the largest is 1
    starts = np.arange(0, len(w), block)
    cdf = np.cumsum(np.add.reduceat(w, starts, dtype=np.float64))  # [N / block] the CDF at block ends
    u = rng.random() * cdf[-1]  # where the draw falls, in [0, total)
    b = min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)  # its block
    weights = w[starts[b] : starts[b] + block]
    inner = np.cumsum(weights, dtype=np.float64)  # the CDF inside that block
    i = int(np.searchsorted(inner, u - (cdf[b - 1] if b else 0.0), side="right"))
    if i == len(weights):  # past the block's end by a rounding error: its last token that can be drawn
        i = int(np.flatnonzero(weights)[-1])
    return int(starts[b]) + i


# ---------------------------------------------------------------------------------------- decoding
def left_pad(prompts: Sequence[Sequence[int]]):  # B prompts -> [B, L] ids, [B, L] valid, [B, L] positions
    """Prompts of different lengths as one batch, right-aligned so that every row's next token
    goes in the same column: padding (id 0, any valid id would do) on the left, `valid` False
    there, and positions counting from each row's first real token."""
    lengths = np.array([len(p) for p in prompts])
    L = int(lengths.max())
    pad = L - lengths
    ids = np.zeros((len(prompts), L), dtype=np.intp)
    valid = np.arange(L)[None, :] >= pad[:, None]
    for b, p in enumerate(prompts):
        ids[b, pad[b] :] = p
    positions = np.maximum(np.arange(L)[None, :] - pad[:, None], 0)
    return ids, valid, positions


class RowSampler:
    """One row's choice of tokens: its options, random generator, the tokens it has seen (prompt and
    output, for the repetition penalty; None when off) and how many it has produced.

    `choose` picks the next token from the row's logits; `done` says the row may produce no more
    (EOS was drawn, unless `ignore_eos`, or `max_new_tokens` reached). Shared by `Decoder` and the
    server's continuous batching, so that both choose the same tokens from the same seed.
    """

    def __init__(self, prompt: Sequence[int], options: GenerationOptions, rng: np.random.Generator, vocab_size: int):
        self.options, self.rng = options, rng
        self.n_new = 0
        self.ended = False  # drew EOS
        self.seen = None  # [V] bool
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[list(prompt)] = True

    @property
    def done(self) -> bool:
        return self.ended or self.n_new >= self.options.max_new_tokens

    def choose(self, logits, eos: int) -> int | None:  # [V] scratch float32, changed in place -> id
        """The next token, counted and marked seen; None (and `done`) when it is EOS that ends the row."""
        token = next_token(logits, self.options, self.rng, self.seen)
        if token == eos and not self.options.ignore_eos:
            self.ended = True
            return None
        self.n_new += 1
        if self.seen is not None:
            self.seen[token] = True
        return token


def copy_rows(out, cache, rows) -> None:  # [n_layer, 2, b, H, w, D] <- rows of [n_layer, 2, B, H, w, D]
    """out[:, :, j] = cache[:, :, rows[j]], row by row: straight from one buffer into the other
    (`cache[:, :, rows]` would first copy the rows into a temporary, then copy them again)."""
    for j, i in enumerate(rows):
        out[:, :, j] = cache[:, :, i]


class Decoder:
    """Batched, KV-cached decoding of several prompts, one token per live row per step.

    Iterating yields, at each step, a dict {row: token} of the rows that produced a token. A row
    ends at its `max_new_tokens`, at EOS (which is not yielded) unless `ignore_eos`, or when the
    caller calls `finish(row)` (a stop string matched).
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], options: Sequence[GenerationOptions],
                 rngs: Sequence[np.random.Generator]):  # fmt: skip
        if not prompts or not len(prompts) == len(options) == len(rngs):
            raise ValueError("need one options object and one generator per prompt, and at least one prompt")
        self.model, self.options, self.rngs = model, list(options), list(rngs)
        config = model.config
        self.prompts = [list(p) for p in prompts]
        for p, o in zip(self.prompts, self.options):
            if not p:
                raise ValueError("a prompt must have at least one token")
            if len(p) + o.max_new_tokens > config.n_ctx:
                raise ValueError(
                    f"prompt of {len(p)} tokens + max_new_tokens={o.max_new_tokens} exceeds the context of "
                    f"{config.n_ctx} tokens; lower max_new_tokens to {config.n_ctx - len(p)} or shorten the prompt"
                )
            if min(p) < 0 or max(p) >= config.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {config.vocab_size}), got {min(p)}..{max(p)}")
        self.eos = config.eos_token_id
        self.finished: set[int] = set()
        self.samplers = [RowSampler(p, o, r, config.vocab_size) for p, o, r in zip(self.prompts, self.options, self.rngs)]

    @property
    def n_new(self) -> list[int]:
        """How many tokens each row has produced."""
        return [s.n_new for s in self.samplers]

    def finish(self, row: int) -> None:
        """Stop generating for `row` (its next step is skipped and it leaves the batch)."""
        self.finished.add(row)

    def __iter__(self) -> Iterator[dict[int, int]]:
        model, config = self.model, self.model.config
        B = len(self.prompts)
        ids, valid, positions = left_pad(self.prompts)  # [B, L] each
        L = ids.shape[1]
        S_max = L + max(o.max_new_tokens for o in self.options) - 1  # the last token is never fed back
        key_valid = np.zeros((B, S_max), dtype=bool)  # [B, S]: False where a row is padding
        key_valid[:, :L] = valid
        H, D = config.n_head, config.n_embd // config.n_head
        # One buffer for every layer's keys and values: [n_layer, 2, B, H, S_max, D]. np.empty is
        # free until written; a row's unwritten columns are never read (masked or beyond `start`).
        cache = np.empty((config.n_layer, 2, B, H, S_max, D), dtype=np.float32)

        rows = np.arange(B)  # batch index -> original row
        has_padding = not valid.all()
        mask = causal_mask(key_valid[:, :L], 0, L)
        x = gpt2(ids, positions, model.params, config, mask=mask, kv_cache=cache, start=0)  # [B, L, C]
        logits = lm_head(x[:, -1], model.lm_head_weight)  # [B, V]: only the last position is needed
        start = L
        while True:
            step, alive = {}, []
            for i, row in enumerate(rows):
                row = int(row)
                if row in self.finished:
                    continue
                sampler = self.samplers[row]
                token = sampler.choose(logits[i], self.eos)
                if token is None:  # EOS
                    self.finished.add(row)
                    continue
                step[row] = token
                if sampler.done:
                    self.finished.add(row)
                else:
                    alive.append(i)
            if step:
                # The logits the tokens came from ([B', V], after in-place processing), row order `rows`.
                self.logits, self.rows = logits, rows
                yield step  # the caller may call finish() on rows here
            alive = [i for i in alive if int(rows[i]) not in self.finished]
            if not alive:
                return
            new = np.array([step[int(rows[i])] for i in alive], dtype=np.intp)[:, None]  # [B', 1]
            if len(alive) < len(rows):  # drop finished rows from every buffer
                keep = np.array(alive)
                rows, key_valid, positions = rows[keep], key_valid[keep], positions[keep]
                # Copy only the columns written so far; the rest of the new buffer stays unallocated.
                kept = np.empty((*cache.shape[:2], len(keep), *cache.shape[3:]), dtype=cache.dtype)
                copy_rows(kept[:, :, :, :, :start], cache[:, :, :, :, :start], keep)
                cache = kept
                has_padding = bool((~key_valid[:, :start]).any())
            key_valid[:, start] = True
            positions = positions[:, -1:] + 1  # [B', 1]
            mask = causal_mask(key_valid[:, : start + 1], start, 1) if has_padding else None
            x = gpt2(new, positions, model.params, config, mask=mask, kv_cache=cache, start=start)  # [B', 1, C]
            logits = lm_head(x[:, -1], model.lm_head_weight)  # [B', V]
            start += 1


# ---------------------------------------------------------------------------------------- text
class RowText:
    """One row's continuation as text: bytes are decoded as they arrive (a character split across
    tokens waits for its last byte), stop strings are looked for, and `take()` hands out the part
    of the text that is decided (nothing that a stop string could still remove)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.stopped = False
        self._given = 0  # characters already handed out by take()
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string has now appeared (the text is cut before it)."""
        return self._extend(self._decoder.decode(self.tokenizer.decode_single_token_bytes(token)))

    def close(self) -> None:
        """No more tokens: an unfinished character at the end becomes U+FFFD."""
        if not self.stopped:
            self._extend(self._decoder.decode(b"", final=True))
            self._holdback = 0

    def _extend(self, piece: str) -> bool:
        if self.stopped or not piece:
            return self.stopped
        searched_to = max(0, len(self.text) - self._holdback)  # a new match must end in the new piece
        self.text += piece
        hits = [i for i in (self.text.find(s, searched_to) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped, self._holdback = True, 0
        return self.stopped

    def take(self) -> str:
        """The text decided since the last call."""
        end = len(self.text) - (0 if self.stopped else self._holdback)
        if end <= self._given:
            return ""
        piece, self._given = self.text[self._given : end], end
        return piece


def prepare_prompts(tokenizer, prompts, *, bos: int) -> list[list[int]]:
    """Encode prompt strings; special-token text in a prompt is the special token, as in transformers.
    An empty prompt is conditioned on <|endoftext|>, the token GPT-2 saw before every document."""
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings; prompt {i} is {type(p).__name__}")
        out.append(tokenizer.encode(p, allowed_special="all") or [bos])
    return out


def check_prompts(prompt_or_prompts) -> tuple[list[str], bool]:
    if isinstance(prompt_or_prompts, str):
        return [prompt_or_prompts], True
    if not isinstance(prompt_or_prompts, (list, tuple)):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt_or_prompts).__name__}")
    if not prompt_or_prompts:
        raise ValueError("the list of prompts is empty; pass at least one prompt")
    return list(prompt_or_prompts), False


def generate_text(model, prompts: list[str], options: GenerationOptions, rngs, *, return_full_text: bool) -> list[str]:
    """Generate for each prompt; the continuation is cut at the first stop string."""
    ids = prepare_prompts(model.tokenizer, prompts, bos=model.config.bos_token_id)
    texts = [RowText(model.tokenizer, options.stop) for _ in prompts]
    decoder = Decoder(model, ids, [options] * len(prompts), rngs)
    for step in decoder:
        for row, token in step.items():
            if texts[row].add(token):
                decoder.finish(row)
    for t in texts:
        t.close()
    return [p + t.text if return_full_text else t.text for p, t in zip(prompts, texts)]


def generate_ids(model, prompts: Sequence[Sequence[int]], options: GenerationOptions, rngs) -> list[list[int]]:
    """New ids per prompt, without the EOS; with stop strings, up to the token that completed one."""
    texts = [RowText(model.tokenizer, options.stop) for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    decoder = Decoder(model, prompts, [options] * len(prompts), rngs)
    for step in decoder:
        for row, token in step.items():
            out[row].append(token)
            if options.stop and texts[row].add(token):
                decoder.finish(row)
    return out


def stream_text(model, prompt: str, options: GenerationOptions, rng, *, return_full_text: bool) -> Iterator[str]:
    """Pieces of text as they are decided; they join to what `generate_text` returns."""
    (ids,) = prepare_prompts(model.tokenizer, [prompt], bos=model.config.bos_token_id)
    decoder = Decoder(model, [ids], [options], [rng])  # validates before the first piece
    if return_full_text and prompt:
        yield prompt
    text = RowText(model.tokenizer, options.stop)
    for step in decoder:
        if text.add(step[0]):
            decoder.finish(0)
        piece = text.take()
        if piece:
            yield piece
    text.close()
    piece = text.take()
    if piece:
        yield piece
