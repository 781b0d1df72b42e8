"""The methods of the model card's table, built on gpt2np.scoring's log-probs of chosen tokens.

- `perplexity` (sliding windows over one text), `score_lines` / `line_perplexity` (each line its own
  document, One Billion Word);
- `lambada` (the whole last word, greedily), `score_continuations` (several continuations of one
  shared context, the context run once into a KV cache through `gpt2np.engine.continuation_states`,
  falling back to `score_tokens` for a candidate that does not fit after the whole context), and
  `multiple_choice` / `cbt` (the most likely completion).

Shape letters as in `gpt2np.model`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from .. import engine
from ..scoring import (
    DEFAULT_BATCH_SIZE,
    check_batch_size,
    model_log_probs,
    perplexity_figures,
    safe_exp,
    score_texts,
    score_tokens,
    sliding_windows,
    text_ids,
    window_options,
)
from .data import CLOZE_BLANK, DETOKENIZERS, ClozeExample, _check_detokenizer

# --------------------------------------------------------------------------------------------
# Perplexity with a sliding window


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
    max_length, stride = window_options(model.config.n_ctx, max_length, stride)
    if limit is not None and words is not False:
        raise ValueError("words counts the whole text and limit scores only part of it: pass one of them, not both")
    n_words = _count_or_words(text, words)
    ids = text_ids(model.tokenizer, text, prepend_eot=prepend_eot, limit=None if limit is None else _check_limit(limit))
    (log_probs,) = score_texts(
        model, [ids], max_length=max_length, stride=stride, batch_size=batch_size, progress=progress, desc="perplexity"
    )
    log_prob_sum = float(log_probs.sum())
    result = perplexity_figures(log_prob_sum, len(ids) - 1, len(model.tokenizer.decode_bytes(ids[1:])))
    if n_words is not None:
        result |= {"words": n_words, "ppl_word": safe_exp(-log_prob_sum / n_words)}
    return result | {
        "max_length": max_length,
        "stride": stride,
        "prepend_eot": prepend_eot,
        "windows": len(sliding_windows(len(ids), max_length=max_length, stride=stride)),
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
    eot = model.tokenizer.eot_token
    texts = []
    for n, line in enumerate(lines):
        ids = [eot, *model.tokenizer.encode(line, disallowed_special=()), *([eot] if eos else [])]
        if len(ids) < 2:
            raise ValueError(f"line {n + 1} is empty: nothing to score (pass eos=True to score its end)")
        texts.append(ids)
    return score_texts(
        model, texts, max_length=max_length, stride=stride, batch_size=batch_size, progress=progress, desc="lines"
    )


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
    max_length, stride = window_options(model.config.n_ctx, max_length, stride)
    scored = score_lines(
        model, lines, eos=eos, max_length=max_length, stride=stride, batch_size=batch_size, progress=progress
    )
    nll_sum = -sum(float(log_probs.sum()) for log_probs in scored)
    tokens = sum(len(log_probs) for log_probs in scored)
    result = {"ppl": safe_exp(nll_sum / tokens), "nll": nll_sum / tokens, "tokens": tokens, "lines": len(lines)}
    if words is not None:
        result |= {"words": words, "ppl_word": safe_exp(nll_sum / words)}
    return result | {"eos": eos, "prepend_eot": True, "max_length": max_length, "stride": stride}


def _count_or_words(text: str, words: bool | int) -> int | None:
    """The word count `perplexity` reports for its `words` option (None when not asked)."""
    if words is False:
        return None
    n_words = len(text.split()) if words is True else words
    if isinstance(n_words, bool) or not isinstance(n_words, int) or n_words < 1:
        raise ValueError(f"words must be True (count the text's words) or a positive count, got {words!r}")
    return n_words


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
        "ppl": safe_exp(sum(nll) / tokens),
        "ppl_word": safe_exp(sum(nll) / len(nll)),
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
    check_batch_size(batch_size)
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
        log_probs, greedy, _, _ = model_log_probs(
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


def _check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return limit
