"""Scoring: the log-probability a model gives to chosen tokens. The one owner of its formula and of
the sliding-window rule, for every caller:

- `GPT2.score` and `/v1/completions`' echo (`score_ids`), log-probs reported while generating
  (gpt2np.engine's rows that ask, through `log_probs`), `gpt2np batch --task score` and
  gpt2np.evaluate's perplexities (`score_texts`), LAMBADA, cloze and 1BW (`score_tokens`,
  `model_log_probs`).

The formula (`log_probs`): log softmax(logits)[target], a float32 log-sum-exp whose exponentials
are summed in float64, so the result carries float32's logits but no accumulation error; with `top`,
the k most likely tokens and theirs, most likely first, equal logits by id. Logits are computed only
where a token is scored, a block of rows at a time (a full [L, V] matrix is 200 MB for L = 1024).

The window rule (`sliding_windows`): a text longer than a window is scored by windows of
`max_length` tokens moving by `stride`, every token but the first scored exactly once.

Shape letters as in gpt2np.model: B batch, L positions of a padded batch, C channels, V vocabulary,
N scored tokens, k alternatives.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from .model import lm_head
from .runner import parallel

LOGIT_ROWS = 256  # rows of logits computed at once: 256 x 50,257 float32 is 51 MB
DEFAULT_BATCH_SIZE = 4  # sequences per forward pass
DEFAULT_STRIDE = 512  # how far a window moves, unless it is shorter


class LogProbs(NamedTuple):
    """Scored tokens: their log-probs, whether each was the model's first choice, and the `top` most
    likely tokens at each position with their log-probs (natural logs, float64)."""

    log_probs: np.ndarray  # [N] float64
    greedy: np.ndarray  # [N] bool: the target is the argmax (first maximum, as argmax breaks ties)
    top_ids: np.ndarray  # [N, k]
    top_log_probs: np.ndarray  # [N, k] float64


# ---------------------------------------------------------------------------------------- the formula
def log_probs(logits, targets, *, top: int = 0, out: LogProbs | None = None) -> LogProbs:  # [n, V], [n] -> [n]...
    """log softmax(logits)[target] for each row, whether the target is the argmax, and the `top` most
    likely tokens. `logits` is float32 scratch: it is overwritten. `out`, if given, is filled."""
    n = len(logits)
    out = out if out is not None else empty(n, top)
    rows = np.arange(n)
    best = logits.argmax(axis=-1)  # [n]; one pass gives both the argmax and the maximum
    out.greedy[:] = best == targets  # argmax's tie rule: the first maximum wins
    chosen = logits[rows, targets]  # [n]
    maxima = logits[rows, best]  # [n]
    if top:
        _top_tokens(logits, out.top_ids, out.top_log_probs)
    logits -= maxima[:, None]
    np.exp(logits, out=logits)
    log_sum = np.log(logits.sum(axis=-1, dtype=np.float64))  # log sum exp(logit - max)
    out.log_probs[:] = chosen.astype(np.float64) - maxima - log_sum
    if top:
        out.top_log_probs[:] -= (maxima + log_sum)[:, None]
    return out


def empty(n: int, top: int = 0) -> LogProbs:
    return LogProbs(
        np.empty(n, dtype=np.float64), np.empty(n, dtype=bool), np.zeros((n, top), np.intp), np.zeros((n, top))
    )


def _top_tokens(logits, ids_out, values_out) -> None:  # [n, V] -> [n, k] ids, [n, k] logits as float64
    """The k largest logits of each row and their ids, largest first, equal logits by id."""
    k = ids_out.shape[1]
    best = np.argpartition(-logits, k - 1, axis=-1)[:, :k] if k < logits.shape[1] else np.argsort(-logits, axis=-1)
    for r, ids in enumerate(best):
        ids = ids[np.lexsort((ids, -logits[r, ids]))]
        ids_out[r], values_out[r] = ids, logits[r, ids]


def target_log_probs(hidden, wte, targets, *, top: int = 0, rows: int = LOGIT_ROWS, pool=None) -> LogProbs:
    """`log_probs` of the logits hidden @ wte.T ([N, C], [V, C], [N]), computed a block of `rows` rows
    at a time; with a pool (gpt2np.threads), the blocks (smaller, so that every thread has one) run
    on its threads."""
    N = len(targets)
    out = empty(N, top)
    if pool is not None:
        rows = max(1, min(rows, -(-N // pool.n)))

    def block(s):  # rows s..s+rows, written into their part of `out`
        part = LogProbs(*(a[s : s + rows] for a in out))
        log_probs(lm_head(hidden[s : s + rows], wte), targets[s : s + rows], top=top, out=part)

    parallel(pool, block, range(0, N, rows))
    return out


def model_log_probs(model, hidden, targets, *, top: int = 0) -> LogProbs:  # [N, C], [N] -> ...
    """`target_log_probs` with the model's LM head, on the model's threads when there are enough rows."""
    with model.threads.forward(len(hidden)) as pool:
        return target_log_probs(hidden, model.lm_head_weight, targets, top=top, pool=pool)


# ---------------------------------------------------------------------------------------- sequences
def score_ids(model, ids: Sequence[int], *, top: int = 0) -> LogProbs:
    """Every token of one sequence after the first, scored from the tokens before it (one pass), with
    the `top` most likely tokens at each position: N = len(ids) - 1."""
    ids = model.check_ids(np.asarray(ids))  # [n]
    x = model.hidden_states(ids)[:-1]  # [n - 1, C]: position t predicts token t + 1
    return model_log_probs(model, x, ids[1:], top=top)


def score_tokens(
    model,
    sequences: Sequence[tuple[Sequence[int], int]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    desc: str = "scoring",
    unit: str = "seq",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Score the tail of each sequence: for `(ids, first)`, the tokens `ids[first:]`, each predicted
    from every token before it in `ids`.

    Returns, per sequence and in the input order, `(log_probs, greedy)`: float64 [n] natural-log
    probabilities of the n = len(ids) - first scored tokens, and bool [n], True where the token is
    the model's argmax. Sequences are sorted by length and run `batch_size` at a time, right-padded
    into [B, L] batches (attention is causal, so a real position never sees the padding after it);
    `progress` shows a bar on stderr (`desc`, counted in `unit`s), one step per sequence.
    """
    check_batch_size(batch_size)
    for ids, first in sequences:
        if not 1 <= first <= len(ids) - 1 or len(ids) > model.config.n_ctx:
            raise ValueError(
                f"cannot score a sequence of {len(ids)} tokens from token {first}: need 1 <= first < len(ids) "
                f"<= {model.config.n_ctx} (the model's context)"
            )
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    results: list = [None] * len(sequences)
    with tqdm(total=len(sequences), desc=desc, unit=unit, disable=not progress, file=sys.stderr, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            for i, scored in zip(order[start : start + batch_size], _score_batch(model, batch)):
                results[i] = scored
            bar.update(len(batch))
    return results


def _score_batch(model, batch) -> list[tuple[np.ndarray, np.ndarray]]:
    """One forward pass over right-padded sequences; logits only at the scored positions."""
    B, L = len(batch), max(len(ids) for ids, _ in batch)
    tokens = np.zeros((B, L), dtype=np.intp)  # padding id 0: its positions are never read
    rows_b, rows_t, targets, counts = [], [], [], []
    for b, (ids, first) in enumerate(batch):
        ids = np.asarray(ids, dtype=np.intp)
        tokens[b, : len(ids)] = ids
        rows_b.append(np.full(len(ids) - first, b))
        rows_t.append(np.arange(first - 1, len(ids) - 1))  # position t predicts token t + 1
        targets.append(ids[first:])
        counts.append(len(ids) - first)
    x = model.hidden_states(tokens)  # [B, L, C]
    scored = model_log_probs(model, x[np.concatenate(rows_b), np.concatenate(rows_t)], np.concatenate(targets))
    splits = np.cumsum(counts)[:-1]
    return list(zip(np.split(scored.log_probs, splits), np.split(scored.greedy, splits)))


# ---------------------------------------------------------------------------------------- windows
def sliding_windows(n_tokens: int, *, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows `(begin, end, first)` that score tokens 1..n_tokens-1 exactly once.

    Window k runs `ids[begin:end]` with `begin = k * stride` and `end = min(begin + max_length,
    n_tokens)`, and scores the tokens `first..end-1` not scored by an earlier window (HuggingFace's
    "perplexity of fixed-length models"). So each scored token sees at least `max_length - stride`
    tokens of context, except in the first window. Token 0 has nothing before it and is never
    scored. A token can only be predicted from a position before it, so windows overlap by at
    least one token: `stride == max_length` advances by `max_length - 1` (disjoint scored
    chunks of `max_length - 1` tokens, each with one token of context).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a window needs one token of context), got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(
            f"stride must be between 1 and max_length ({max_length}), got {stride}: a larger stride "
            f"would skip the tokens between windows; pass stride={min(DEFAULT_STRIDE, max_length // 2) or 1}, "
            f"or stride={max_length} for windows that do not overlap"
        )
    step = min(stride, max_length - 1)
    windows, begin, first = [], 0, 1
    while first < n_tokens:
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, first))
        begin, first = begin + step, end
    return windows


def window_options(n_ctx: int, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """The window's defaults and bound: `max_length` the model's context (never longer), `stride`
    min(512, max_length)."""
    max_length = n_ctx if max_length is None else max_length
    if max_length > n_ctx:
        raise ValueError(f"max_length ({max_length}) is longer than the model's context: pass max_length <= {n_ctx}")
    return max_length, min(DEFAULT_STRIDE, max_length) if stride is None else stride


def score_texts(
    model,
    texts: Sequence[Sequence[int]],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    desc: str = "scoring",
) -> list[np.ndarray]:
    """Every token but the first of each text (token ids, at least 2), scored by `sliding_windows`
    (defaults: `window_options`); the windows of all texts share batches. Returns, per text, the
    float64 log-probs of its tokens 1..n-1: what scoring that text alone gives."""
    max_length, stride = window_options(model.config.n_ctx, max_length, stride)
    sequences, owners = [], []
    for n, ids in enumerate(texts):
        ids = np.asarray(ids, dtype=np.intp)  # windows are views into it, not copies
        for begin, end, first in sliding_windows(len(ids), max_length=max_length, stride=stride):
            sequences.append((ids[begin:end], first - begin))
            owners.append(n)
    scored = score_tokens(model, sequences, batch_size=batch_size, progress=progress, desc=desc, unit="window")
    per_text: list[list[np.ndarray]] = [[] for _ in texts]
    for n, (log_probs_, _) in zip(owners, scored):
        per_text[n].append(log_probs_)
    return [np.concatenate(parts) if parts else np.zeros(0) for parts in per_text]


def text_ids(tokenizer, text: str, *, prepend_eot: bool = False, limit: int | None = None) -> list[int]:
    """A text's ids as perplexity scores them: special-token text is plain text, the first `limit`
    tokens if given, <|endoftext|> first with `prepend_eot` (so that the text's first token is
    scored too). A ValueError unless there are 2 tokens or more: the first is context only."""
    ids = tokenizer.encode(text, disallowed_special=())[:limit]
    if prepend_eot:
        ids = [tokenizer.eot_token] + ids
    if len(ids) < 2:
        raise ValueError(
            f"the text has {len(ids)} token(s): at least 2 are needed (the first is context only), "
            "or pass prepend_eot=True to score a one-token text"
        )
    return ids


def perplexity_figures(log_prob_sum: float, tokens: int, n_bytes: int) -> dict:
    """A scored text's figures: ppl = exp(nll) and nll per token (nats), tokens, bytes, and
    bits_per_byte = total nll / ln 2 / bytes (None for no bytes)."""
    nll = -log_prob_sum / tokens
    return {
        "ppl": safe_exp(nll),
        "nll": nll,
        "tokens": tokens,
        "bytes": n_bytes,
        "bits_per_byte": -log_prob_sum / math.log(2) / n_bytes if n_bytes else None,
    }


def safe_exp(x: float) -> float:
    """exp, but inf instead of OverflowError (a random model's per-word perplexity can overflow)."""
    return math.exp(x) if x < 709 else math.inf


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
