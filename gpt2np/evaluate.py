"""Zero-shot evaluation: perplexity, LAMBADA and cloze scoring, every method choice explicit.

GPT-2's zero-shot table (Radford et al., 2019, "Language Models are Unsupervised Multitask
Learners", section 3) moves by several points with choices the paper leaves implicit: how long a
window is and how far it moves, whether the text is detokenized first, whether a LAMBADA answer is
the whole last word or only its last token, whether an <|endoftext|> starts the text. Here each
choice is a keyword argument, echoed in the results, and described in docs/evaluation.md.

Three kinds of task:

- perplexity (WikiText, PTB, enwik8, text8): the text is tokenized once and scored by a sliding
  window (`sliding_windows`): every token but the first is predicted exactly once, from up to
  `max_length` tokens of context (`perplexity`);
- LAMBADA: the last word of a passage, `" " + word`, must be predicted greedily, every one of its
  tokens (`lambada`);
- cloze (CBT): each candidate completes the sentence; the completion with the highest
  log-likelihood wins (`multiple_choice`, `cbt`).

Sequences are scored by `score_tokens`, which right-pads them into [B, L] batches. Attention is
causal, so a real position never sees the padding that comes after it: padding changes no score
and is simply not read. Cloze candidates share their context: `score_continuations` runs it once
into a KV cache and each batch of candidates from its end (falling back to `score_tokens` for a
candidate that does not fit after the whole context). Logits are computed only where a token is
scored, a chunk of rows at a time (a full [L, V] logits matrix is 200 MB for L = 1024), and
log-softmax is a float32 log-sum-exp accumulated in float64.

Shape letters as in `gpt2np.model`: B batch, L positions of a padded batch, C channels,
V vocabulary, N scored tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import engine
from .download import cached_download, endpoint
from .model import lm_head

# Rows of logits computed at once: 256 x 50,257 float32 is 51 MB.
LOGIT_ROWS = 256
DEFAULT_BATCH_SIZE = 4
DEFAULT_STRIDE = 512
# enwik8 and text8 are 100,000,000 bytes; their usual test split is the last 5,000,000
# (90M train / 5M valid / 5M test, as the character-level literature splits them).
ENWIK8_TEXT8_SIZE = 100_000_000
ENWIK8_TEXT8_TEST = 5_000_000


# --------------------------------------------------------------------------------------------
# Scoring: log-probabilities of chosen tokens, batched


def score_tokens(model, sequences: Sequence[tuple[Sequence[int], int]], *, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: bool = True, desc: str = "scoring",
                 unit: str = "seq") -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
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
    log_probs, greedy = target_log_probs(hidden, model.lm_head_weight, np.concatenate(targets))
    splits = np.cumsum(counts)[:-1]
    return list(zip(np.split(log_probs, splits), np.split(greedy, splits)))


def target_log_probs(hidden, wte, targets, *, rows: int = LOGIT_ROWS):  # [N, C], [V, C], [N] -> [N], [N]
    """log softmax(hidden @ wte.T)[target] for each row, and whether the target is the argmax.

    The log-sum-exp subtracts each row's maximum before exp (no overflow) and sums the float32
    exponentials in float64, so the result carries float32's logits but no accumulation error.
    """
    N = len(targets)
    log_probs, greedy = np.empty(N, dtype=np.float64), np.empty(N, dtype=bool)
    for s in range(0, N, rows):
        logits = lm_head(hidden[s : s + rows], wte)  # [n, V]
        n, target = len(logits), targets[s : s + rows]
        rows_n = np.arange(n)
        best = logits.argmax(axis=-1)  # [n]; one pass gives both the argmax and the maximum
        greedy[s : s + n] = best == target  # argmax's tie rule: the first maximum wins
        chosen = logits[rows_n, target]  # [n]
        top = logits[rows_n, best]  # [n], the row maxima
        logits -= top[:, None]
        np.exp(logits, out=logits)
        log_sum = np.log(logits.sum(axis=-1, dtype=np.float64))  # log sum exp(logit - top)
        log_probs[s : s + n] = chosen.astype(np.float64) - top - log_sum
    return log_probs, greedy


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


def perplexity(model, text: str, *, max_length: int | None = None, stride: int | None = None,
               prepend_eot: bool = False, words: bool | int = False, limit: int | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> dict:  # fmt: skip
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
        raise ValueError(f"max_length ({max_length}) is longer than the model's context: "
                         f"pass max_length <= {model.config.n_ctx}")  # fmt: skip
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
        raise ValueError(f"the text has {len(ids)} token(s): at least 2 are needed (the first is context only), "
                         "or pass prepend_eot=True to score a one-token text")  # fmt: skip
    windows = sliding_windows(len(ids), max_length=max_length, stride=stride)
    id_array = np.asarray(ids, dtype=np.intp)  # windows are views into it, not copies
    scored = score_tokens(model, [(id_array[begin:end], first - begin) for begin, end, first in windows],
                          batch_size=batch_size, progress=progress, desc="perplexity", unit="window")  # fmt: skip
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
    return result | {"max_length": max_length, "stride": stride, "prepend_eot": prepend_eot, "windows": len(windows),
                     "limit": limit}  # fmt: skip


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
        raise ValueError(f"a LAMBADA passage needs a context and a last word separated by a space, got {passage[:60]!r}")
    return context, " " + word


def lambada(model, examples: Iterable[str], *, prepend_eot: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
            progress: bool = True) -> dict:  # fmt: skip
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
        raise ValueError(f"a continuation of {len(target_ids)} tokens leaves no room for context "
                         f"in {model.config.n_ctx} tokens")  # fmt: skip
    ids = (context_ids + target_ids)[-model.config.n_ctx :]
    return ids, len(ids) - len(target_ids)


def _context_and_targets(model, context: str, continuations: Sequence[str], *,
                         prepend_eot: bool) -> tuple[list[int], list[list[int]]]:  # fmt: skip
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
            raise ValueError(f"a continuation of {len(target_ids)} tokens leaves no room for context "
                             f"in {model.config.n_ctx} tokens")  # fmt: skip
        targets.append(target_ids)
    return context_ids, targets


def score_continuations(model, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True, desc: str = "scoring",
                        unit: str = "seq") -> list[list[tuple[np.ndarray, np.ndarray]]]:  # fmt: skip
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
                for j, scored in zip(cached, _score_cached(model, context_ids, [targets[j] for j in cached],
                                                           batch_size=batch_size, bar=bar)):  # fmt: skip
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
        log_probs, greedy = target_log_probs(np.concatenate(states), model.lm_head_weight,
                                             np.concatenate([np.asarray(t, dtype=np.intp) for t in batch]))  # fmt: skip
        splits = np.cumsum([len(t) for t in batch])[:-1]
        results += zip(np.split(log_probs, splits), np.split(greedy, splits))
        done += B
        bar.update(B)
    return results


def multiple_choice(model, context: str, candidates: Sequence[str], *, prepend_eot: bool = False,
                    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> dict:  # fmt: skip
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
    (scored,) = score_continuations(model, [group], batch_size=batch_size, progress=progress, desc="candidates",
                                    unit="candidate")  # fmt: skip
    scores = [float(log_probs.sum()) for log_probs, _ in scored]
    return {"scores": scores, "best": int(np.argmax(scores))}


@dataclass(frozen=True)
class ClozeExample:
    """One CBT question: 20 story sentences, a query with `XXXXX` for the missing word, the answer
    and the candidates (10 in CBT)."""

    story: tuple[str, ...]
    query: str
    answer: str
    candidates: tuple[str, ...]


CLOZE_BLANK = "XXXXX"


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


def cbt(model, examples: Iterable[ClozeExample], *, detokenizer: str = "cbt", prepend_eot: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> dict:  # fmt: skip
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
    return {"accuracy": float(np.mean(correct)), "examples": len(examples), "detokenizer": detokenizer,
            "prepend_eot": prepend_eot}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Detokenizers: undo the word-level tokenization of WikiText, PTB and CBT before GPT-2 reads them
#
# GPT-2 reads raw text; these datasets were tokenized for word-level models ("don 't", "1 @,@ 000",
# "`` Yes , '' he said"). The rules below are the well-known family used to compare GPT-2 on them;
# the paper's own detokenizers were not published, so numbers can differ slightly.


def _apply(text: str, rules: Sequence[tuple[str, str]], *, regex: bool = False) -> str:
    for old, new in rules:
        text = re.sub(old, new, text) if regex else text.replace(old, new)
    return text


_WIKITEXT_RULES = (
    ("s '", "s'"),  # plural possessive: "the players ' union"
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),  # joined numbers and words: "1 @,@ 000", "state @-@ of"
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),  # section headings
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"), ("\n ", "\n"),  # spaces around line breaks
    (" 's", "'s"),
)  # fmt: skip
_WIKITEXT_PAIRS = (  # no space just inside brackets and double quotes
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
)  # fmt: skip


def wikitext_detokenize(text: str) -> str:
    """WikiText -> plain text: `" @-@ "` -> `"-"`, `" @,@ "` -> `","`, `" @.@ "` -> `"."`, no space
    before punctuation (`" , "` -> `", "`), `"s '"` -> `"s'"`, `" 's"` -> `"'s"`, headings
    `"= = Title = ="` -> `"== Title =="`, no spaces inside brackets and quotes, none around line
    breaks. `<unk>` is kept as text (the paper notes it is rare in GPT-2's training data)."""
    return _apply(_apply(text, _WIKITEXT_RULES), _WIKITEXT_PAIRS, regex=True)


_CONTRACTIONS = tuple((f" {c}", c) for c in ("n't", "'s", "'re", "'ve", "'m", "'ll", "'d"))


def ptb_detokenize(text: str) -> str:
    """Penn Treebank (Mikolov's lower-cased, punctuation-free version) -> plain text: contractions
    rejoined (`"do n't"` -> `"don't"`, `"company 's"` -> `"company's"`), the space that begins and
    ends each line removed. `<unk>` and the number placeholder `N` are kept."""
    lines = [_apply(f" {line.strip()}", _CONTRACTIONS).strip() for line in text.split("\n")]
    return "\n".join(lines)


_CBT_RULES = (
    ("`` ", '"'), (" ''", '"'), ("''", '"'), ("``", '"'),  # LaTeX-style quotes
    ("-LRB- ", "("), (" -RRB-", ")"),
    (" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"), (" !", "!"), (" ?", "?"),
) + _CONTRACTIONS  # fmt: skip


def cbt_detokenize(text: str) -> str:
    """Children's Book Test -> plain text: LaTeX quotes ``` `` ``` and `''` -> `"`, no space before
    punctuation (`" ,"` -> `","`), contractions rejoined, `-LRB-`/`-RRB-` -> brackets."""
    return _apply(text, _CBT_RULES)


def no_detokenize(text: str) -> str:
    """The text as it is."""
    return text


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "none": no_detokenize,
    "wikitext": wikitext_detokenize,
    "ptb": ptb_detokenize,
    "cbt": cbt_detokenize,
}


def detokenize(text: str, *, style: str) -> str:
    """Apply one of `DETOKENIZERS` ("none", "wikitext", "ptb", "cbt")."""
    return DETOKENIZERS[_check_detokenizer(style)](text)


def _check_detokenizer(name: str) -> str:
    if name not in DETOKENIZERS:
        raise ValueError(f"unknown detokenizer {name!r}; choose one of {', '.join(DETOKENIZERS)}")
    return name


# --------------------------------------------------------------------------------------------
# Reading data files


def read_text(path: str | os.PathLike, *, what: str = "text") -> str:
    """A UTF-8 text file, or a ValueError that names the file and what was expected."""
    data = _read_bytes(path, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{os.fspath(path)} is not UTF-8 text ({e}); pass the {what} as a UTF-8 file") from None


def _read_bytes(path: str | os.PathLike, *, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"no such file: {os.fspath(path)}; pass the path of the {what}") from None
    except IsADirectoryError:
        raise ValueError(f"{os.fspath(path)} is a folder; pass the path of the {what} file inside it") from None
    except OSError as e:
        raise ValueError(f"cannot read {os.fspath(path)}: {e}") from None
    if not data.strip():
        raise ValueError(f"{os.fspath(path)} is empty; pass the {what}")
    return data


def read_lambada(path: str | os.PathLike) -> list[str]:
    """LAMBADA passages: JSON lines with a "text" field (OpenAI's `lambada_test.jsonl`), or plain
    text with one passage a line."""
    text = read_text(path, what="LAMBADA test file (JSON lines with a 'text' field, or one passage a line)")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines[0][1].lstrip().startswith("{"):
        return [line.strip() for _, line in lines]
    passages = []
    for n, line in lines:
        try:
            record = json.loads(line)
            passage = record["text"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{os.fspath(path)} line {n}: expected a JSON object with a 'text' field, "
                             f"got {line[:60]!r}") from None  # fmt: skip
        if not isinstance(passage, str):
            raise ValueError(f"{os.fspath(path)} line {n}: 'text' must be a string")
        passages.append(passage)
    return passages


def read_cbt(path: str | os.PathLike) -> list[ClozeExample]:
    """Children's Book Test questions (`cbtest_CN_test_2500ex.txt`, `cbtest_NE_test_2500ex.txt`):
    blocks of numbered lines separated by blank lines; lines 1-20 are the story, line 21 is
    `query<TAB>answer<TAB><TAB>candidate|candidate|...`."""
    text = read_text(path, what="CBT test file (cbtest_CN_test_2500ex.txt or cbtest_NE_test_2500ex.txt)")
    examples, story, where = [], [], os.fspath(path)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        number, _, body = line.partition(" ")
        if not number.isdigit():
            raise ValueError(f"{where} line {n}: expected a numbered CBT line ('1 ...' to "
                             f"'21 query<TAB>answer<TAB><TAB>a|b|...'), got {line[:60]!r}")  # fmt: skip
        if "\t" not in body:
            story.append(body.strip())
            continue
        fields = body.split("\t")
        if len(fields) != 4 or CLOZE_BLANK not in fields[0]:
            raise ValueError(f"{where} line {n}: a CBT query line is 'query with {CLOZE_BLANK}<TAB>answer<TAB><TAB>a|b|...'")
        query, answer, _, candidates = fields
        candidates = tuple(c for c in candidates.strip().split("|") if c)
        if answer.strip() not in candidates or not story:
            raise ValueError(f"{where} line {n}: the answer {answer!r} must be one of the candidates, after the story lines")
        examples.append(ClozeExample(tuple(story), query.strip(), answer.strip(), candidates))
        story = []
    if not examples:
        raise ValueError(f"{where} holds no CBT question (a line '21 query<TAB>answer<TAB><TAB>a|b|...')")
    return examples


def read_char_test(path: str | os.PathLike, *, what: str) -> str:
    """enwik8 / text8: the whole file, or its test split (the last 5,000,000 bytes) when it is the
    full 100,000,000-byte corpus. A split that starts inside a UTF-8 character skips its tail bytes."""
    data = _read_bytes(path, what=what)
    if len(data) == ENWIK8_TEXT8_SIZE:
        data = data[-ENWIK8_TEXT8_TEST:]
        while data and data[0] & 0xC0 == 0x80:  # a UTF-8 continuation byte
            data = data[1:]
    return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Downloading with a checksum (through gpt2np.download, the path the checkpoint files take too)


@dataclass(frozen=True)
class DataSource:
    """A public copy of a test file: where to fetch it (tried in order) and its sha256."""

    filename: str
    sha256: str
    size: int
    urls: tuple[str, ...]


def _hub_dataset_url(repo: str, revision: str, path: str) -> str:
    return f"{endpoint()}/datasets/{repo}/resolve/{revision}/{path}"


# OpenAI's LAMBADA test set (5,153 passages, detokenized), as the GPT-2 authors published it.
# The same bytes are in EleutherAI/lambada_openai, pinned to a commit.
LAMBADA_SOURCE = DataSource(
    filename="lambada_test.jsonl",
    sha256="4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    size=1_819_752,
    urls=(
        _hub_dataset_url(
            "EleutherAI/lambada_openai", "900124bf3b8235c6daf21033af9948b3f07346c4", "data/lambada_test.jsonl"
        ),
        "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
    ),
)


def dataset_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where downloaded test files go: `cache_dir`, else $XDG_CACHE_HOME/gpt2np/datasets, else
    ~/.cache/gpt2np/datasets."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gpt2np" / "datasets"


def download(
    source: DataSource,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    timeout: tuple[float, float] | None = None,
    offline: bool | None = None,
) -> Path:
    """The cached copy of `source`, downloading it first when absent (or when its sha256 is wrong).

    It takes the checkpoint files' path, `gpt2np.download.cached_download`, so a test file gets the same
    care: each URL in turn, into a temporary file under a lock, resumed after a dropped connection, renamed
    into place only when its size and sha256 match. A progress bar goes to stderr (`progress=False` for
    none). Offline mode (`offline=True`, or HF_HUB_OFFLINE=1 as for models) reads the cache only. Raises
    an OSError that names the fix: the network, --data FILE, or offline mode.
    """
    return cached_download(
        source.urls,
        dataset_cache_dir(cache_dir) / source.filename,
        sha256=source.sha256,
        size=source.size,
        offline=offline,
        progress=progress,
        timeout=timeout,
        instead="download it by hand and pass --data FILE",
    )


# --------------------------------------------------------------------------------------------
# Tasks: the model card's table


@dataclass(frozen=True)
class Task:
    """One row group of the model card's table: how its data is read and which numbers it reports.

    `card` lists (metric key, label, GPT-2 124M's published figure); accuracies are fractions."""

    name: str
    kind: str  # "perplexity", "lambada" or "cbt"
    card: tuple[tuple[str, str, float], ...]
    detokenizer: str = "none"
    word_units: bool = False  # report ppl_word in canonical units (words + one <eos> a line)
    char_level: bool = False  # enwik8/text8: the test split of the 100M-byte file
    source: DataSource | None = None
    data_hint: str = ""


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("lambada", "lambada", (("accuracy", "accuracy", 0.4599), ("ppl_word", "ppl (per word)", 35.13)),
             source=LAMBADA_SOURCE, data_hint="lambada_test.jsonl (OpenAI's LAMBADA test set, JSON lines)"),
        Task("cbt-cn", "cbt", (("accuracy", "accuracy", 0.8765),), detokenizer="cbt",
             data_hint="cbtest_CN_test_2500ex.txt from the CBT release"),
        Task("cbt-ne", "cbt", (("accuracy", "accuracy", 0.834),), detokenizer="cbt",
             data_hint="cbtest_NE_test_2500ex.txt from the CBT release"),
        Task("wikitext2", "perplexity", (("ppl_word", "ppl (per word)", 29.41),), detokenizer="wikitext",
             word_units=True, data_hint="wikitext-2/wiki.test.tokens from the WikiText-2 release"),
        Task("ptb", "perplexity", (("ppl_word", "ppl (per word)", 65.85),), detokenizer="ptb", word_units=True,
             data_hint="ptb.test.txt from Mikolov's simple-examples archive"),
        Task("enwik8", "perplexity", (("bits_per_byte", "bits per byte", 1.16),), char_level=True,
             data_hint="enwik8 (the 100,000,000-byte file inside enwik8.zip)"),
        Task("text8", "perplexity", (("bits_per_byte", "bits per character", 1.17),), char_level=True,
             data_hint="text8 (the 100,000,000-byte file inside text8.zip)"),
        Task("wikitext103", "perplexity", (("ppl_word", "ppl (per word)", 37.50),), detokenizer="wikitext",
             word_units=True, data_hint="wikitext-103/wiki.test.tokens from the WikiText-103 release"),
    )
}  # fmt: skip
# The table's last column, One Billion Word (75.20), is not a task here: see docs/evaluation.md.


def evaluate_task(model, task: str, *, data: str | os.PathLike | None = None, max_length: int | None = None,
                  stride: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE, limit: int | None = None,
                  prepend_eot: bool = False, detokenizer: str | None = None, cache_dir=None,
                  progress: bool = True) -> dict:  # fmt: skip
    """Run one task of the model card's table on a data file (or LAMBADA's checked download).

    Returns `{"task", "data", "metrics", "model_card"}`: `metrics` is the result of `perplexity`,
    `lambada` or `cbt`; `model_card` the published figures under the same keys. `stride` defaults
    to min(512, max_length); `detokenizer` to the task's own; `limit` keeps the first `limit`
    examples (LAMBADA, CBT) or tokens (perplexity tasks).
    """
    spec = _task(task)
    detokenizer = _check_detokenizer(spec.detokenizer if detokenizer is None else detokenizer)
    if limit is not None:
        _check_limit(limit)
    path = Path(data) if data is not None else _download_for(spec, cache_dir=cache_dir, progress=progress)
    if spec.kind == "lambada":
        passages = [detokenize(passage, style=detokenizer) for passage in read_lambada(path)[:limit]]
        metrics = lambada(model, passages, prepend_eot=prepend_eot, batch_size=batch_size, progress=progress)
        metrics["detokenizer"] = detokenizer
    elif spec.kind == "cbt":
        metrics = cbt(model, read_cbt(path)[:limit], detokenizer=detokenizer, prepend_eot=prepend_eot,
                      batch_size=batch_size, progress=progress)  # fmt: skip
    else:
        if spec.char_level:
            original = read_char_test(path, what=spec.data_hint)
        else:
            original = read_text(path, what=spec.data_hint)
        words = count_words(original, eos_per_line=True) if spec.word_units and limit is None else False
        metrics = perplexity(model, detokenize(original, style=detokenizer), max_length=max_length, stride=stride,
                             prepend_eot=prepend_eot, words=words, limit=limit, batch_size=batch_size,
                             progress=progress)  # fmt: skip
        metrics["detokenizer"] = detokenizer
    return {"task": spec.name, "data": os.fspath(path), "metrics": metrics,
            "model_card": {key: value for key, _, value in spec.card}}  # fmt: skip


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def _download_for(spec: Task, *, cache_dir, progress: bool) -> Path:
    if spec.source is None:
        raise ValueError(
            f"task {spec.name} needs a data file: pass --data with {spec.data_hint} "
            "(gpt2np downloads only files whose checksum it can pin; see docs/evaluation.md)"
        )
    return download(spec.source, cache_dir=cache_dir, progress=progress)


def _check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return limit


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# --------------------------------------------------------------------------------------------
# The command: `gpt2np eval` and scripts/evaluate.py


def format_table(report: dict, *, model: str = "") -> str:
    """The model card's figures next to the measured ones, one row per metric."""
    spec = TASKS[report["task"]]
    metrics = report["metrics"]
    rows = [("task", "metric", "model card", "measured")]
    for key, label, card in spec.card:
        percent = key == "accuracy"
        shown = label + (" (%)" if percent else "")
        measured = metrics.get(key)
        if measured is None:
            value = "n/a (--limit)" if metrics.get("limit") else "n/a"
        else:
            value = f"{100 * measured:.2f}" if percent else f"{measured:.2f}" if measured >= 10 else f"{measured:.4f}"
        rows.append((spec.name, shown, f"{100 * card:.2f}" if percent else f"{card:.2f}", value))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    method = ", ".join(f"{k}={v}" for k, v in metrics.items() if k in _METHOD_KEYS and v is not None)
    counts = ", ".join(f"{k}={v}" for k, v in metrics.items() if k in ("tokens", "examples", "words", "bytes"))
    footer = [f"model: {model}" if model else "", f"data: {report['data']}", f"method: {method}", f"scored: {counts}"]
    return "\n".join(lines + [line for line in footer if line])


_METHOD_KEYS = ("max_length", "stride", "prepend_eot", "detokenizer", "limit")


def build_parser(prog: str = "gpt2np eval") -> argparse.ArgumentParser:
    from .cli import ArgumentParser  # a bad flag is a one-line UsageError, as in every gpt2np command

    parser = ArgumentParser(
        prog=prog,
        description="Zero-shot evaluation of a GPT-2 checkpoint on a task of the GPT-2 model card's table; "
        "prints the model card's figure next to the measured one. Methods: docs/evaluation.md.",
    )
    parser.add_argument("--model", default="gpt2", help="checkpoint folder or hub name (default: gpt2)")
    parser.add_argument("--task", required=True, choices=list(TASKS), help="which row of the table")
    parser.add_argument("--data", help="the task's test file; without it, LAMBADA is downloaded (checksum-pinned) "
                        "and the other tasks stop with the file to fetch")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--max-length", type=int, help="window length for perplexity tasks (default: the model's context)")
    parser.add_argument("--stride", type=int, help="how far the window moves (default: min(512, max length))")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"windows or sequences per forward pass (default: {DEFAULT_BATCH_SIZE})")  # fmt: skip
    parser.add_argument("--limit", type=int, help="score only the first N examples (LAMBADA, CBT) or tokens (others)")
    parser.add_argument("--prepend-eot", action="store_true", help="start every text with <|endoftext|> (default: no)")
    parser.add_argument("--detokenizer", choices=list(DETOKENIZERS), help="override the task's detokenizer")
    parser.add_argument("--cache-dir", help="where downloaded test files go (default: ~/.cache/gpt2np/datasets)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "gpt2np eval") -> int:
    """Run the command; returns the exit status (2 with one line on stderr on any error)."""
    from .cli import UsageError, load_model, one_line

    try:
        args = build_parser(prog).parse_args(argv)
        model = load_model(args.model, revision="main", cache_dir=None, progress=not args.quiet)
        report = evaluate_task(
            model, args.task, data=args.data, max_length=args.max_length, stride=args.stride,
            batch_size=args.batch_size, limit=args.limit, prepend_eot=args.prepend_eot,
            detokenizer=args.detokenizer, cache_dir=args.cache_dir, progress=not args.quiet,
        )  # fmt: skip
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    report = {"model": args.model} | report
    print(json.dumps(report, indent=2) if args.json else format_table(report, model=args.model))
    return 0
