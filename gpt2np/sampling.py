"""The sampler: every generation option, and how one row's next token is chosen from its logits.

The semantics follow HuggingFace transformers' `generate`: logits processors first
(`repetition_penalty`), then, when sampling, the warpers in the order temperature -> top_k -> top_p,
then a draw from the softmax. Unlike transformers, `top_k` is off unless asked (transformers
silently applies top_k=50 when sampling).

Shape letters as in gpt2np.model: V vocabulary.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np


# ---------------------------------------------------------------------------------------- options
class OptionError(ValueError):
    """A generation option outside its range. The message is `field` then `rule` ("top_p must be in
    (0, 1] ..."), so that a caller with its own spelling of the field (the request's "params.top_p")
    can name it its way. Wrong types are TypeErrors, in the words of the caller's language."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field} {rule}")
        self.field, self.rule = field, rule


@dataclass(frozen=True)
class GenerationOptions:
    """Every generation option, validated: the one place their defaults are written. The defaults
    mirror the GPT-2 model card's endpoint."""

    max_new_tokens: int = 50
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Prompt-lookup decoding (transformers' names): guess up to this many next tokens from an earlier
    # occurrence of the last `max_matching_ngram_size` tokens, and verify them in one pass (gpt2np.engine).
    # The same greedy ids as without; when sampling, the same distribution. None turns it off.
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int = 2

    def __post_init__(self):
        _check_number("max_new_tokens", self.max_new_tokens, integer=True)
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        for flag in ("do_sample", "ignore_eos"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            _check_number(name, getattr(self, name))
        if self.top_k is not None:
            _check_number("top_k", self.top_k, integer=True)
            if self.top_k < 1:
                raise OptionError("top_k", f"must be >= 1 (or unset, to turn it off), got {self.top_k}")
        if self.do_sample and self.temperature <= 0:
            fix = "for deterministic output turn do_sample off (greedy)"
            raise OptionError("temperature", f"must be > 0 when sampling, got {self.temperature}; {fix}")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"must be in (0, 1] (1.0 turns it off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise OptionError("repetition_penalty", f"must be > 0 (1.0 turns it off), got {self.repetition_penalty}")
        if self.prompt_lookup_num_tokens is not None:
            _check_number("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens, integer=True)
            if self.prompt_lookup_num_tokens < 1:
                raise OptionError(
                    "prompt_lookup_num_tokens",
                    f"must be >= 1 (or unset, to turn it off), got {self.prompt_lookup_num_tokens}",
                )
        _check_number("max_matching_ngram_size", self.max_matching_ngram_size, integer=True)
        if self.max_matching_ngram_size < 1:
            raise OptionError("max_matching_ngram_size", f"must be >= 1, got {self.max_matching_ngram_size}")
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


OPTION_NAMES = tuple(f.name for f in fields(GenerationOptions))


def _check_number(name: str, value, *, integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float (a JSON number can be one)
        finite = False
    if not integer and not finite:
        shown = f"an integer of {len(str(abs(value)))} digits" if isinstance(value, numbers.Integral) else value
        raise OptionError(name, f"must be finite, got {shown}")


def check_seed(seed) -> int | None:
    """The seed rule: None (fresh entropy) or a non-negative integer."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer or None, got {seed!r}")
    if seed < 0:
        raise OptionError("seed", f"must be a non-negative integer, got {seed}")
    return int(seed)


MAX_LOGPROBS = 5  # alternatives reported per token: OpenAI's limit, and what a reader of them needs


def check_logprobs(logprobs, *, name: str = "logprobs") -> int | None:
    """The log-probs rule: None (none asked) or how many alternatives per token, 0 to MAX_LOGPROBS
    (0: the chosen token's alone)."""
    if logprobs is None:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, numbers.Integral):
        raise TypeError(f"{name} must be an integer or None, got {logprobs!r}")
    if not 0 <= logprobs <= MAX_LOGPROBS:
        raise OptionError(name, f"must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    return int(logprobs)


def generation_arguments(kwargs: dict, *, method: str, text: bool = True) -> tuple[GenerationOptions, int | None, bool]:
    """The keyword arguments of `generate`, `generate_ids` (`text=False`) or `stream`, checked:
    (options, seed, return_full_text). The one way they are read, so every entry point has the same
    names and defaults: GenerationOptions' fields, seed None (fresh entropy), return_full_text True."""
    known = (*OPTION_NAMES, *(("return_full_text",) if text else ()), "seed")
    unknown = [name for name in kwargs if name not in known]
    if unknown:
        known_ones = ", ".join(known)
        raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}; its options are {known_ones}")
    options = dict(kwargs)
    seed = check_seed(options.pop("seed", None))
    return_full_text = options.pop("return_full_text", True)
    if not isinstance(return_full_text, (bool, np.bool_)):
        raise TypeError(f"return_full_text must be True or False, got {return_full_text!r}")
    return GenerationOptions.make(**options), seed, bool(return_full_text)


def row_generators(seed, n: int) -> list[np.random.Generator]:
    """One random generator per row, all derived from `seed` (None: fresh entropy).

    Row i of a batch gets the i-th child of the seed, so a prompt's samples do not depend on how
    many other prompts share its call: generate(["a", "b"], seed=1)[0] == generate("a", seed=1).
    """
    return [np.random.default_rng(child) for child in np.random.SeedSequence(check_seed(seed)).spawn(n)]


@dataclass(frozen=True)
class LogitAdjustments:
    """OpenAI's additions to the logits, beside GenerationOptions rather than in it (the model card's
    endpoint, the command line and `generate` keep exactly their options): `logit_bias` adds a fixed
    amount to chosen tokens' logits, and for every token t generated c[t] times so far,
    logit[t] -= c[t] * frequency_penalty + (c[t] > 0) * presence_penalty. Ranges are OpenAI's."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    def __post_init__(self):
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name))
            if not -2 <= getattr(self, name) <= 2:
                raise OptionError(name, f"must be in [-2, 2] (0 turns it off), got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            _check_number("a logit_bias token id", token, integer=True)
            _check_number(f"logit_bias[{token}]", bias)
            if token < 0:
                raise OptionError("logit_bias", f"token ids must be >= 0, got {token}")
            if not -100 <= bias <= 100:
                raise OptionError(f"logit_bias[{token}]", f"must be in [-100, 100], got {bias}")

    @property
    def counts_tokens(self) -> bool:
        """Whether the penalties need the count of each generated token."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def __bool__(self) -> bool:
        return self.counts_tokens or bool(self.logit_bias)


# ---------------------------------------------------------------------------------------- sampler
# float32's range. A temperature or penalty whose results leave it is computed in the limit (see below).
_F32_TINY, _F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def apply_repetition_penalty(logits, seen, penalty):  # [V], [V] bool -> [V]
    """CTRL's penalty (Keskar et al., 2019), as transformers applies it: for tokens already in the
    prompt or output, divide a positive logit by `penalty` and multiply a negative one. In float32,
    as transformers computes it, when the results fit; else `_penalty_in_the_limit`."""
    scores = logits[seen]
    if _F32_TINY <= penalty <= _F32_MAX:
        with np.errstate(over="ignore"):  # an overflow is an inf, caught just below
            penalized = np.where(scores > 0, scores / penalty, scores * penalty)
        if np.isfinite(penalized).all():
            logits[seen] = penalized
            return logits
    return _penalty_in_the_limit(logits, seen, penalty)


def _penalty_in_the_limit(logits, seen, penalty):  # [V], [V] bool -> [V]
    """The penalty near 0 or huge, where float32 cannot hold its results: computed in float64, then
    shifted so the largest logit is 0 (a shift changes no probability and no choice) and put back in
    float32, where what falls below its range is -inf, probability 0. Where even float64 overflows (a
    positive logit divided by a penalty near 0), those tokens outweigh all others: they alone remain,
    weighted by (logit - their largest) / penalty, which does fit."""
    z = logits.astype(np.float64)
    scores = z[seen]
    with np.errstate(over="ignore", under="ignore"):
        z[seen] = np.where(scores > 0, scores / penalty, scores * penalty)
        top = z.max()
        if np.isposinf(top):
            positive = scores > 0
            z.fill(-np.inf)
            z[np.flatnonzero(seen)[positive]] = (scores[positive] - scores[positive].max()) / penalty
        elif np.isneginf(top):  # every token seen, every logit negative and multiplied past float64
            z = (scores - scores.max()) * penalty
        else:
            z -= top
        logits[:] = z
    return logits


def apply_logit_bias(logits, logit_bias):  # [V] -> [V], in place
    """OpenAI's logit_bias: a fixed amount added to the logits of chosen tokens (ids past the
    logits' end, which the tokenizer cannot decode, are never chosen anyway)."""
    for token, bias in logit_bias:
        if token < len(logits):
            logits[token] += np.float32(bias)
    return logits


def apply_count_penalties(logits, counts, presence_penalty, frequency_penalty):  # [V], [V] int -> [V], in place
    """OpenAI's additive penalties over the tokens generated so far (not the prompt's):
    logit[t] -= c[t] * frequency_penalty + (c[t] > 0) * presence_penalty."""
    seen = np.flatnonzero(counts[: len(logits)])
    logits[seen] -= (counts[seen] * frequency_penalty + presence_penalty).astype(np.float32)
    return logits


def apply_temperature(logits, temperature):  # [V] -> [V], in place
    """logits / temperature, in float32 as transformers computes it, when the quotients (and their
    differences) fit float32 with room to spare. Otherwise (a temperature near 0 or huge, or logits
    that the penalty left at -inf) it is (logits - max) / temperature in float64, put back in float32:
    the shift changes no probability and no top_k or top_p choice, and a quotient below float32's
    range is -inf, probability 0. So as the temperature goes to 0 the draw becomes greedy among the
    tokens tied at the top, and as it grows the draw becomes uniform."""
    hi, lo = float(logits.max()), float(logits.min())
    widest = max(hi - lo, -lo, hi)  # the largest quotient, and difference of two, is this / temperature
    if _F32_TINY <= temperature <= _F32_MAX and math.isfinite(lo) and widest / temperature < _F32_MAX / 4:
        logits /= np.float32(temperature)
        return logits
    with np.errstate(over="ignore", under="ignore"):
        logits[:] = (logits.astype(np.float64) - hi) / temperature
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
    apply_temperature(logits, options.temperature)
    keep = None
    if options.top_k is not None:
        keep = top_k_keep(logits, options.top_k)
    if options.top_p < 1.0:
        keep = top_p_keep(logits, options.top_p, keep)
    return keep


def next_token(
    logits,
    options: GenerationOptions,
    rng: np.random.Generator,
    seen=None,
    *,
    adjust: LogitAdjustments | None = None,
    counts=None,
    draft: int | None = None,
) -> int:  # [V] -> id
    """Choose the next token from one row's logits (a scratch float32 array, changed in place).
    The order: logit_bias, repetition penalty, OpenAI's count penalties (with `adjust`; `counts`
    [V] says how often each token was generated), then greedy or the warpers and the draw.

    `draft`, a token guessed for this position (prompt lookup), changes nothing when greedy (the
    caller keeps it if it is the argmax). When sampling it is kept with its probability p(draft)
    under the warped distribution, and otherwise a token is drawn from that distribution without
    it (renormalised): the speculative sampling rule for a draft that is certain (Leviathan et al.,
    2023; Chen et al., 2023), which draws every token with exactly its probability p."""
    if adjust and adjust.logit_bias:
        apply_logit_bias(logits, adjust.logit_bias)
    if options.repetition_penalty != 1.0 and seen is not None:
        apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if adjust and adjust.counts_tokens and counts is not None:
        apply_count_penalties(logits, counts, adjust.presence_penalty, adjust.frequency_penalty)
    if not options.do_sample:
        return int(np.argmax(logits))
    keep = warp(logits, options)
    ids = None if keep is None else np.flatnonzero(keep)  # the tokens that may be drawn
    z = logits if ids is None else logits[ids]
    if draft is not None and draft < len(logits) and (keep is None or keep[draft]):
        d = draft if ids is None else int(np.searchsorted(ids, draft))  # the draft's place in z
        w = np.exp(z - z.max())
        p = float(w[d]) / np.add.reduce(w, dtype=np.float64)
        if rng.random() < p:
            return draft
        z[d] = -np.inf  # the rest of the distribution, renormalised by the draw (z is scratch)
    i = draw(z, rng)
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


# ---------------------------------------------------------------------------------------- one row
class RowSampler:
    """One row's choice of tokens: its options, random generator, the tokens it has seen (prompt and
    output, for the repetition penalty; None when off) and how many it has produced.

    `choose` picks the next token from the row's logits; `done` says the row may produce no more
    (EOS was drawn, unless `ignore_eos`, or `max_new_tokens` reached). Each row of the engine
    (gpt2np.engine) has one, so a row chooses the same tokens from the same seed whoever shares its batch.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        options: GenerationOptions,
        rng: np.random.Generator,
        vocab_size: int,
        adjust: LogitAdjustments | None = None,
    ):
        self.options, self.rng, self.adjust = options, rng, adjust
        self.n_new = 0
        self.ended = False  # drew EOS
        self.seen = None  # [V] bool
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[list(prompt)] = True
        self.counts = np.zeros(vocab_size, dtype=np.int64) if adjust and adjust.counts_tokens else None  # [V]

    @property
    def done(self) -> bool:
        return self.ended or self.n_new >= self.options.max_new_tokens

    def choose(self, logits, eos: int, draft: int | None = None) -> int | None:  # [V] scratch float32 -> id
        """The next token, counted and marked seen; None (and `done`) when it is EOS that ends the row.
        `draft`: a guess for this token (prompt lookup; see `next_token`)."""
        seen = None if self.seen is None else self.seen[: len(logits)]  # logits may stop at the tokenizer's ids
        token = next_token(logits, self.options, self.rng, seen, adjust=self.adjust, counts=self.counts, draft=draft)
        if token == eos and not self.options.ignore_eos:
            self.ended = True
            return None
        self.n_new += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        return token
