"""Scoring: the log-probability a model gives to chosen tokens, and the methods built on it.

- `score_tokens` scores the tail of each sequence, the sequences right-padded into [B, L]
  batches. Attention is causal, so a real position never sees the padding after it: padding
  changes no score and is simply not read.
- `score_continuations` scores several continuations of one shared context, the context run once
  into a KV cache (`gpt2np.engine.continuation_states`), falling back to `score_tokens` for a
  candidate that does not fit after the whole context.
- Logits are computed only where a token is scored, a chunk of rows at a time (a full [L, V]
  logits matrix is 200 MB for L = 1024), and log-softmax is a float32 log-sum-exp accumulated in
  float64 (`target_log_probs`).
- `perplexity` (sliding windows), `lambada` (the whole last word, greedily) and `multiple_choice`
  / `cbt` (the most likely completion) are the methods of the model card's table.

Shape letters as in `gpt2np.model`: B batch, L positions of a padded batch, C channels,
V vocabulary, N scored tokens.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from .. import engine
from ..model import lm_head, parallel
from .data import CLOZE_BLANK, DETOKENIZERS, ClozeExample, _check_detokenizer

# Rows of logits computed at once: 256 x 50,257 float32 is 51 MB.
LOGIT_ROWS = 256
DEFAULT_BATCH_SIZE = 4
DEFAULT_STRIDE = 512


# --------------------------------------------------------------------------------------------
# Scoring: log-probabilities of chosen tokens, batched


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
    the model's argmax (first maximum, as `argmax` breaks ties). Sequences are sorted by length and
    run `batch_size` at a time; `progress` shows a bar on stderr (`desc`, counted in `unit`s), one
    step per sequence.
    """
    _check_batch_size(batch_size)
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
    x = engine.hidden_states(model, model.check_ids(tokens))  # [B, L, C]; right padding: causality hides it
    hidden = x[np.concatenate(rows_b), np.concatenate(rows_t)]  # [N, C]
    log_probs, greedy = model_log_probs(model, hidden, np.concatenate(targets))
    splits = np.cumsum(counts)[:-1]
    return list(zip(np.split(log_probs, splits), np.split(greedy, splits)))


def model_log_probs(model, hidden, targets, *, alternatives=None):  # [N, C], [N] -> [N], [N]
    """`target_log_probs` with the model's LM head, on the model's threads when there are enough rows."""
    with model.threads.forward(len(hidden)) as pool:
        return target_log_probs(hidden, model.lm_head_weight, targets, alternatives=alternatives, pool=pool)


def target_log_probs(
    hidden, wte, targets, *, rows: int = LOGIT_ROWS, alternatives=None, pool=None
):  # [N, C], [V, C], [N] -> [N], [N]
    """log softmax(hidden @ wte.T)[target] for each row, and whether the target is the argmax.

    The log-sum-exp subtracts each row's maximum before exp (no overflow) and sums the float32
    exponentials in float64, so the result carries float32's logits but no accumulation error.
    `alternatives`, a pair of arrays ([N, k] ids, [N, k] float64), is filled with each row's k most
    likely tokens and their log-probs (most likely first, equal logits by id), from the same logits.
    With a pool, the blocks of `rows` rows (smaller, so that every thread has one) run on its threads.
    """
    N = len(targets)
    log_probs, greedy = np.empty(N, dtype=np.float64), np.empty(N, dtype=bool)
    if pool is not None:
        rows = max(1, min(rows, -(-N // pool.n)))

    def block(s):  # rows s..s+rows
        logits = lm_head(hidden[s : s + rows], wte)  # [n, V]
        n, target = len(logits), targets[s : s + rows]
        rows_n = np.arange(n)
        best = logits.argmax(axis=-1)  # [n]; one pass gives both the argmax and the maximum
        greedy[s : s + n] = best == target  # argmax's tie rule: the first maximum wins
        chosen = logits[rows_n, target]  # [n]
        top = logits[rows_n, best]  # [n], the row maxima
        if alternatives is not None:
            _top_tokens(logits, alternatives[0][s : s + n], alternatives[1][s : s + n])
        logits -= top[:, None]
        np.exp(logits, out=logits)
        log_sum = np.log(logits.sum(axis=-1, dtype=np.float64))  # log sum exp(logit - top)
        log_probs[s : s + n] = chosen.astype(np.float64) - top - log_sum
        if alternatives is not None:
            alternatives[1][s : s + n] -= (top + log_sum)[:, None]

    parallel(pool, block, range(0, N, rows))
    return log_probs, greedy


def _top_tokens(logits, ids_out, values_out) -> None:  # [n, V] -> [n, k] ids, [n, k] logits as float64
    """The k largest logits of each row and their ids, largest first, equal logits by id."""
    k = ids_out.shape[1]
    if k == 0:
        return
    best = np.argpartition(-logits, k - 1, axis=-1)[:, :k] if k < logits.shape[1] else np.argsort(-logits, axis=-1)
    for r, ids in enumerate(best):
        ids = ids[np.lexsort((ids, -logits[r, ids]))]
        ids_out[r], values_out[r] = ids, logits[r, ids]


def score_ids(model, ids: Sequence[int], *, top: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every token of one sequence after the first, scored from the tokens before it, with the `top`
    most likely tokens at each position: float64 [n - 1] log-probs, [n - 1, top] ids and
    [n - 1, top] float64 log-probs. The same pass and figures as `score_tokens` for `(ids, 1)`."""
    ids = model.check_ids(np.asarray(ids)[None])  # [1, n]
    x = engine.hidden_states(model, ids)[0, :-1]  # [n - 1, C]: position t predicts token t + 1
    alternatives = (np.zeros((len(x), top), dtype=np.intp), np.zeros((len(x), top), dtype=np.float64))
    log_probs, _ = model_log_probs(model, x, ids[0, 1:], alternatives=alternatives)
    return log_probs, *alternatives


# --------------------------------------------------------------------------------------------
# Perplexity with a sliding window


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


def perplexity(
    model,
    text: str,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    prepend_eot: bool = False,
    words: bool | int = False,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """Perplexity of `text` under `model`, scored with `sliding_windows`.

    Returns a dict:
      ppl            exp(nll): per-token perplexity
      nll            mean negative log-likelihood per scored token, nats
      tokens         scored tokens: every token but the first (len(ids) - 1)
      bytes          UTF-8 bytes of the scored tokens
      bits_per_byte  total nll / ln 2 / bytes (bits per character for ASCII text such as text8)
      words, ppl_word  when `words` is given: exp(total nll / words), the perplexity per word
                     ("canonical unit"); `words=True` counts the whitespace-separated words of
                     `text`, an int is a count made elsewhere (e.g. on the original dataset file)
    and the method: max_length, stride, prepend_eot, windows, limit.

    `max_length` defaults to the model's context (n_ctx), `stride` to 512 (or max_length when that
    is shorter): for GPT-2, 1024-token windows moving by 512. `prepend_eot=True` puts <|endoftext|>
    before the text, so the first token of the text is scored too (`tokens` is then len(text
    tokens)); the default False is HuggingFace's method. `limit` scores only the first `limit`
    tokens of the text (a quick check; word-level figures then do not apply).
    """
    if not isinstance(text, str):
        raise TypeError(f"perplexity() takes the text as a str, got {type(text).__name__}")
    max_length = model.config.n_ctx if max_length is None else max_length
    if max_length > model.config.n_ctx:
        raise ValueError(
            f"max_length ({max_length}) is longer than the model's context: pass max_length <= {model.config.n_ctx}"
        )
    stride = min(DEFAULT_STRIDE, max_length) if stride is None else stride
    if limit is not None and words is not False:
        raise ValueError("words counts the whole text and limit scores only part of it: pass one of them, not both")
    n_words = _count_or_words(text, words)
    ids = model.tokenizer.encode(text, disallowed_special=())
    if limit is not None:
        ids = ids[: _check_limit(limit)]
    if prepend_eot:
        ids = [model.tokenizer.eot_token] + ids
    if len(ids) < 2:
        raise ValueError(
            f"the text has {len(ids)} token(s): at least 2 are needed (the first is context only), "
            "or pass prepend_eot=True to score a one-token text"
        )
    windows = sliding_windows(len(ids), max_length=max_length, stride=stride)
    id_array = np.asarray(ids, dtype=np.intp)  # windows are views into it, not copies
    scored = score_tokens(
        model,
        [(id_array[begin:end], first - begin) for begin, end, first in windows],
        batch_size=batch_size,
        progress=progress,
        desc="perplexity",
        unit="window",
    )
    nll_sum = -sum(float(log_probs.sum()) for log_probs, _ in scored)
    tokens = len(ids) - 1
    n_bytes = len(model.tokenizer.decode_bytes(ids[1:]))
    result = {
        "ppl": _exp(nll_sum / tokens),
        "nll": nll_sum / tokens,
        "tokens": tokens,
        "bytes": n_bytes,
        "bits_per_byte": nll_sum / math.log(2) / n_bytes if n_bytes else math.nan,
    }
    if n_words is not None:
        result |= {"words": n_words, "ppl_word": _exp(nll_sum / n_words)}
    return result | {
        "max_length": max_length,
        "stride": stride,
        "prepend_eot": prepend_eot,
        "windows": len(windows),
        "limit": limit,
    }


# --------------------------------------------------------------------------------------------
# Perplexity of separate lines (One Billion Word)


def score_lines(
    model,
    lines: Sequence[str],
    *,
    eos: bool = True,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> list[np.ndarray]:
    """Log-probabilities of each line scored as its own document, all lines batched together.

    A line is `<|endoftext|> + line`, and with `eos` a closing `<|endoftext|>`: the first token
    conditions, every later one is scored, the closing one standing for the end-of-sentence unit
    of word-level models. A line longer than `max_length` (default: the model's context) is scored
    by `sliding_windows`, as `perplexity` scores a text. Returns, per line, the float64 natural-log
    probabilities of its scored tokens: what scoring that line alone gives.
    """
    max_length, stride = _window_options(model, max_length, stride)
    eot = model.tokenizer.eot_token
    sequences, owners = [], []
    for n, line in enumerate(lines):
        ids = np.asarray(
            [eot, *model.tokenizer.encode(line, disallowed_special=()), *([eot] if eos else [])], dtype=np.intp
        )
        if len(ids) < 2:
            raise ValueError(f"line {n + 1} is empty: nothing to score (pass eos=True to score its end)")
        for begin, end, first in sliding_windows(len(ids), max_length=max_length, stride=stride):
            sequences.append((ids[begin:end], first - begin))
            owners.append(n)
    scored = score_tokens(model, sequences, batch_size=batch_size, progress=progress, desc="lines", unit="window")
    per_line: list[list[np.ndarray]] = [[] for _ in lines]
    for n, (log_probs, _) in zip(owners, scored):
        per_line[n].append(log_probs)
    return [np.concatenate(parts) for parts in per_line]


def line_perplexity(
    model,
    lines: Sequence[str],
    *,
    eos: bool = True,
    words: int | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """Perplexity of lines that are separate documents (One Billion Word's shuffled sentences):
    each line is scored alone (`score_lines`), conditioned on `<|endoftext|>`.

    Returns a dict:
      ppl, nll       per scored token: exp(total nll / tokens), and total nll / tokens in nats
      tokens, lines  scored tokens (each line's tokens, plus its closing <|endoftext|> with `eos`)
      words, ppl_word  when `words` (a count made on the original file) is given: exp(total nll / words)
    and the method: eos, prepend_eot (always True here), max_length, stride.
    """
    lines = list(lines)
    if not lines:
        raise ValueError("no lines to score")
    if words is not None and (isinstance(words, bool) or not isinstance(words, int) or words < 1):
        raise ValueError(f"words must be a positive count, got {words!r}")
    max_length, stride = _window_options(model, max_length, stride)
    scored = score_lines(
        model, lines, eos=eos, max_length=max_length, stride=stride, batch_size=batch_size, progress=progress
    )
    nll_sum = -sum(float(log_probs.sum()) for log_probs in scored)
    tokens = sum(len(log_probs) for log_probs in scored)
    result = {"ppl": _exp(nll_sum / tokens), "nll": nll_sum / tokens, "tokens": tokens, "lines": len(lines)}
    if words is not None:
        result |= {"words": words, "ppl_word": _exp(nll_sum / words)}
    return result | {"eos": eos, "prepend_eot": True, "max_length": max_length, "stride": stride}


def _window_options(model, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """`max_length` (default: the model's context, never longer) and `stride` (default: min(512, max_length))."""
    max_length = model.config.n_ctx if max_length is None else max_length
    if max_length > model.config.n_ctx:
        raise ValueError(
            f"max_length ({max_length}) is longer than the model's context: pass max_length <= {model.config.n_ctx}"
        )
    return max_length, min(DEFAULT_STRIDE, max_length) if stride is None else stride


def _count_or_words(text: str, words: bool | int) -> int | None:
    """The word count `perplexity` reports for its `words` option (None when not asked)."""
    if words is False:
        return None
    n_words = len(text.split()) if words is True else words
    if isinstance(n_words, bool) or not isinstance(n_words, int) or n_words < 1:
        raise ValueError(f"words must be True (count the text's words) or a positive count, got {words!r}")
    return n_words


def _exp(x: float) -> float:
    """exp, but inf instead of OverflowError (a random model's per-word perplexity can overflow)."""
    return math.exp(x) if x < 709 else math.inf


def count_words(text: str, *, eos_per_line: bool = False) -> int:
    """Whitespace-separated words of `text`; with `eos_per_line`, plus one per line.

    The word-level literature counts an <eos> token at the end of every line of WikiText and PTB
    (that is how PTB's test set has 82,430 words), so per-word perplexities there use
    `eos_per_line=True` on the original, tokenized file.
    """
    lines = text.splitlines()
    return sum(len(line.split()) for line in lines) + (len(lines) if eos_per_line else 0)


# --------------------------------------------------------------------------------------------
# LAMBADA and cloze


def split_last_word(passage: str) -> tuple[str, str]:
    """`"... he said Tom"` -> `("... he said", " Tom")`: the context and the target, `" " + last word`."""
    passage = passage.strip()
    context, space, word = passage.rpartition(" ")
    if not space or not context.strip() or not word:
        raise ValueError(
            f"a LAMBADA passage needs a context and a last word separated by a space, got {passage[:60]!r}"
        )
    return context, " " + word


def lambada(
    model,
    examples: Iterable[str],
    *,
    prepend_eot: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """LAMBADA: predict each passage's last word from the passage before it.

    The target is `" " + last_word`, tokenized on its own after the context (`split_last_word`).
    An example is correct only when every token of the target is the model's greedy choice given
    the context and the target's earlier tokens: the whole word, not just its last token. A context
    longer than the model's window keeps its last tokens.

    Returns a dict:
      accuracy             fraction of examples whose whole last word is predicted greedily
      accuracy_last_token  fraction whose last target token alone is the greedy choice (the
                           looser "last token" method some reports use, for comparison)
      ppl                  exp(mean nll per target token)
      ppl_word             exp(mean over examples of the target's total nll): per-word perplexity
      nll                  mean nll per target token, nats
      examples, tokens     counts; and the method (prepend_eot)
    """
    sequences = []
    for passage in examples:
        context, target = split_last_word(passage)
        sequences.append(_continuation(model, context, target, prepend_eot=prepend_eot))
    if not sequences:
        raise ValueError("no LAMBADA examples to score: pass at least one passage")
    scored = score_tokens(model, sequences, batch_size=batch_size, progress=progress, desc="lambada", unit="example")
    nll = [-float(log_probs.sum()) for log_probs, _ in scored]
    tokens = sum(len(log_probs) for log_probs, _ in scored)
    return {
        "accuracy": float(np.mean([greedy.all() for _, greedy in scored])),
        "accuracy_last_token": float(np.mean([greedy[-1] for _, greedy in scored])),
        "ppl": _exp(sum(nll) / tokens),
        "ppl_word": _exp(sum(nll) / len(nll)),
        "nll": sum(nll) / tokens,
        "examples": len(scored),
        "tokens": tokens,
        "prepend_eot": prepend_eot,
    }


def _continuation(model, context: str, continuation: str, *, prepend_eot: bool) -> tuple[list[int], int]:
    """`(ids, first)` for scoring `continuation` after `context`, tokenized separately and cut on the
    left to the model's context."""
    tokenizer = model.tokenizer
    context_ids = tokenizer.encode(context, disallowed_special=())
    target_ids = tokenizer.encode(continuation, disallowed_special=())
    if prepend_eot:
        context_ids = [tokenizer.eot_token] + context_ids
    if not context_ids:
        raise ValueError("the context is empty: nothing predicts the first token; pass prepend_eot=True")
    if not target_ids:
        raise ValueError("the continuation is empty: there is nothing to score")
    if len(target_ids) >= model.config.n_ctx:
        raise ValueError(
            f"a continuation of {len(target_ids)} tokens leaves no room for context in {model.config.n_ctx} tokens"
        )
    ids = (context_ids + target_ids)[-model.config.n_ctx :]
    return ids, len(ids) - len(target_ids)


def _context_and_targets(
    model, context: str, continuations: Sequence[str], *, prepend_eot: bool
) -> tuple[list[int], list[list[int]]]:
    """The context's ids (tokenized once, shared by every continuation) and each continuation's ids,
    with `_continuation`'s checks."""
    tokenizer = model.tokenizer
    context_ids = tokenizer.encode(context, disallowed_special=())
    if prepend_eot:
        context_ids = [tokenizer.eot_token] + context_ids
    if not context_ids:
        raise ValueError("the context is empty: nothing predicts the first token; pass prepend_eot=True")
    targets = []
    for continuation in continuations:
        target_ids = tokenizer.encode(continuation, disallowed_special=())
        if not target_ids:
            raise ValueError("the continuation is empty: there is nothing to score")
        if len(target_ids) >= model.config.n_ctx:
            raise ValueError(
                f"a continuation of {len(target_ids)} tokens leaves no room for context in {model.config.n_ctx} tokens"
            )
        targets.append(target_ids)
    return context_ids, targets


def score_continuations(
    model,
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    desc: str = "scoring",
    unit: str = "seq",
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Score several continuations of one shared context, the context run through the model once.

    `groups` holds `(context_ids, [target_ids, ...])`; the result, per group and per target, is
    `score_tokens`'s `(log_probs, greedy)` for `(context_ids + target_ids, len(context_ids))`, the same
    numbers up to float32 rounding. The context is run once into a KV cache (batch 1), its keys and
    values are copied into `batch_size` rows, and each batch of targets is run from position
    `len(context_ids)`, overwriting only the positions after the context. A target that would not
    fit in the model's context with the whole context before it is cut on the left differently from
    the others: it goes through `score_tokens` (`_continuation`'s cut) instead.
    """
    _check_batch_size(batch_size)
    n_ctx = model.config.n_ctx
    results: list[list] = [[None] * len(targets) for _, targets in groups]
    fallback, owners = [], []  # sequences too long to keep the whole context
    total = sum(len(targets) for _, targets in groups)
    with tqdm(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr, leave=False) as bar:
        for g, (context_ids, targets) in enumerate(groups):
            cached = [j for j, t in enumerate(targets) if len(context_ids) + len(t) <= n_ctx]
            for j in range(len(targets)):
                if len(context_ids) + len(targets[j]) > n_ctx:
                    ids = (list(context_ids) + list(targets[j]))[-n_ctx:]
                    fallback.append((ids, len(ids) - len(targets[j])))
                    owners.append((g, j))
            if cached:
                for j, scored in zip(
                    cached,
                    _score_cached(model, context_ids, [targets[j] for j in cached], batch_size=batch_size, bar=bar),
                ):
                    results[g][j] = scored
        if fallback:
            for (g, j), scored in zip(owners, score_tokens(model, fallback, batch_size=batch_size, progress=False)):
                results[g][j] = scored
            bar.update(len(fallback))
    return results


def _score_cached(model, context_ids, targets, *, batch_size, bar) -> list[tuple[np.ndarray, np.ndarray]]:
    """`score_continuations` for one context and targets that each fit after the whole context."""
    for ids in [context_ids, *targets]:
        model.check_ids(np.asarray(ids)[None])
    results, done = [], 0
    for B, states in engine.continuation_states(model, context_ids, targets, batch_size=batch_size):
        batch = targets[done : done + B]
        log_probs, greedy = model_log_probs(
            model, np.concatenate(states), np.concatenate([np.asarray(t, dtype=np.intp) for t in batch])
        )
        splits = np.cumsum([len(t) for t in batch])[:-1]
        results += zip(np.split(log_probs, splits), np.split(greedy, splits))
        done += B
        bar.update(B)
    return results


def multiple_choice(
    model,
    context: str,
    candidates: Sequence[str],
    *,
    prepend_eot: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """Score each candidate continuation of `context`; the highest total log-likelihood wins.

    A candidate is the rest of the sentence with the choice filled in (for CBT, `" Tom went home."`
    after `"... and then"`): the sum of log p over its tokens given the context is the
    log-likelihood of the completed sentence minus a part shared by every candidate. Sums are
    not length-normalised, as in the GPT-2 paper's CBT method.

    Returns `{"scores": [log-likelihood per candidate], "best": index of the highest}`.
    """
    if not candidates:
        raise ValueError("no candidates to choose from")
    group = _context_and_targets(model, context, candidates, prepend_eot=prepend_eot)
    (scored,) = score_continuations(
        model, [group], batch_size=batch_size, progress=progress, desc="candidates", unit="candidate"
    )
    scores = [float(log_probs.sum()) for log_probs, _ in scored]
    return {"scores": scores, "best": int(np.argmax(scores))}


def cloze_choices(example: ClozeExample, *, detokenizer: str = "cbt") -> tuple[str, list[str]]:
    """The shared context and one continuation per candidate of a CBT question.

    Each candidate fills the blank of the query; the story and the filled query are joined by
    spaces and detokenized. The context is the longest prefix shared by every filled text, cut back
    to a space, so each continuation is the candidate plus the rest of its sentence with a leading
    space (the way GPT-2's tokenizer sees a word inside a sentence).
    """
    detok = DETOKENIZERS[_check_detokenizer(detokenizer)]
    story = " ".join(example.story)
    filled = [detok(f"{story} {example.query.replace(CLOZE_BLANK, c, 1)}") for c in example.candidates]
    shared = os.path.commonprefix(filled)
    cut = shared.rfind(" ")
    if cut <= 0:
        raise ValueError(f"CBT question {example.query[:60]!r}: the candidates leave no shared context")
    return filled[0][:cut], [text[cut:] for text in filled]


def cbt(
    model,
    examples: Iterable[ClozeExample],
    *,
    detokenizer: str = "cbt",
    prepend_eot: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """Children's Book Test accuracy: per question, the candidate whose completed sentence is most
    likely (`multiple_choice`), every candidate of every question batched together.

    Returns `{"accuracy", "examples", "detokenizer", "prepend_eot"}`.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("no CBT examples to score")
    groups = []
    for example in examples:
        context, continuations = cloze_choices(example, detokenizer=detokenizer)
        groups.append(_context_and_targets(model, context, continuations, prepend_eot=prepend_eot))
    scored = score_continuations(model, groups, batch_size=batch_size, progress=progress, desc="cbt", unit="candidate")
    scores = [[float(log_probs.sum()) for log_probs, _ in group] for group in scored]
    correct = [ex.candidates[int(np.argmax(s))] == ex.answer for ex, s in zip(examples, scores)]
    return {
        "accuracy": float(np.mean(correct)),
        "examples": len(examples),
        "detokenizer": detokenizer,
        "prepend_eot": prepend_eot,
    }


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return limit
