"""Zero-shot summarisation of CNN/DailyMail, the GPT-2 paper's way, scored with ROUGE.

The method (Radford et al., 2019, section 3.6): the article, then `"\\nTL;DR:"`; 100 new tokens
sampled with top-k 2; the first three sentences of those tokens are the summary. Each choice is
an argument of `summarize` and comes back in its results:

- the prompt: the article's tokens, then the suffix's, tokenized apart (the suffix is the same
  tokens after every article). An article too long for the context loses its end
  (`truncation="keep_start"`) so that prompt + `max_new_tokens` fit: `gpt2np.engine.check_fits`'s
  rule, whose arithmetic `summary_prompt` uses;
- sampling: `top_k` 2, temperature 1 (the paper names no temperature), `max_new_tokens` 100; a
  summary ends early if the model draws `<|endoftext|>`;
- seeds: article i, counted from 0 in the file's order, draws from the seed's i-th child
  (`gpt2np.sampling.row_generators(seed, n)[i]`), the rule `GPT2.generate` applies to row i of
  one call. So a summary depends on the seed and its article's place, not on the batch size,
  nor on `limit`;
- sentences: `split_sentences`, a documented regex rule (nltk's punkt would need a data download);
- ROUGE: Google's `rouge-score` (the package the hub's `evaluate` wraps), F1 with the Porter
  stemmer on, as HuggingFace's summarisation examples call it. Its ROUGE-Lsum splits a text into
  sentences at newlines, so the summary's sentences are joined by "\\n" (the highlights already
  are); ROUGE-1, -2 and -L read the same string, newlines being only spaces to them.

Articles run as ragged batches through gpt2np's one decoding loop (`gpt2np.generation.run`, what
`GPT2.generate_ids` runs), `batch_size` at a time, with a progress bar on stderr in articles and
generated tokens a second. `rouge-score` is the `eval` extra (`pip install "gpt2np[eval]"`),
imported only when ROUGE is computed.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Sequence

from tqdm import tqdm

from ..engine import check_fits
from ..generation import run, text_rows
from ..sampling import GenerationOptions, row_generators
from ..scoring import DEFAULT_BATCH_SIZE
from .data import SummaryExample

PAPER_SUFFIX = "\nTL;DR:"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TRUNCATIONS = ("keep_start", "keep_end")
EVAL_EXTRA = 'pip install "gpt2np[eval]"'

# The paper's Table 4: ROUGE F1 on the CNN and Daily Mail test set, as fractions. These are GPT-2
# 1.5B's figures (the largest model), not 124M's, and the "random 3 sentences" baseline's; the
# paper reports no ROUGE-Lsum.
PAPER_FIGURES = {
    "GPT-2 1.5B, TL;DR: (paper)": {"rouge1": 0.2934, "rouge2": 0.0827, "rougeL": 0.2658},
    "random 3 sentences (paper)": {"rouge1": 0.2878, "rouge2": 0.0863, "rougeL": 0.2552},
}


class MissingExtra(ImportError, ValueError):
    """An optional package is not installed. An ImportError for Python callers, and a ValueError so
    that `gpt2np eval` reports it as it reports bad input: one line naming the fix, exit status 2."""


# --------------------------------------------------------------------------------------------
# ROUGE, through rouge-score


def rouge_scorer(*, use_stemmer: bool = True):
    """rouge-score's `RougeScorer` for ROUGE-1, -2, -L and -Lsum, or MissingExtra naming the extra."""
    try:
        from rouge_score import rouge_scorer as scorer_module
    except ImportError:
        raise MissingExtra(
            f"the cnn_dailymail task scores summaries with Google's rouge-score package, which is "
            f"not installed: {EVAL_EXTRA}",
            name="rouge_score",
        ) from None
    return scorer_module.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def rouge(summaries: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True) -> list[dict]:
    """ROUGE-1, -2, -L and -Lsum F1 of each summary against its reference, as rouge-score computes
    them. ROUGE-Lsum treats each line of a text as a sentence: pass summaries one sentence a line."""
    if len(summaries) != len(references):
        raise ValueError(f"{len(summaries)} summaries but {len(references)} references: pass one of each per article")
    scorer = rouge_scorer(use_stemmer=use_stemmer)
    return [
        {name: score.fmeasure for name, score in scorer.score(reference, summary).items()}
        for summary, reference in zip(summaries, references)
    ]


# --------------------------------------------------------------------------------------------
# Sentences

# A sentence ends at ".", "!" or "?" (a closing quote or bracket may follow) before whitespace,
# unless the "." ends a single capital ("U.S.", "J. Smith") or a title before a name ("Mr.");
# a line break always ends one.
_TITLES = ("Mr", "Mrs", "Ms", "Dr", "Prof", "Gov", "Sen", "Rep", "Gen", "Lt", "Col", "Sgt", "Capt", "Rev", "St", "Jr")
_CLOSERS = r"\"')\]" + "\N{RIGHT DOUBLE QUOTATION MARK}\N{RIGHT SINGLE QUOTATION MARK}"  # a regex class's body
_NOT_AN_ABBREVIATION = r"(?<!\b[A-Z]\.)" + "".join(rf"(?<!\b{title}\.)" for title in _TITLES)
_SENTENCE_BREAK = re.compile(rf"(?:(?<=[.!?])|(?<=[.!?][{_CLOSERS}])){_NOT_AN_ABBREVIATION}\s+")


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped, empty ones dropped (see `_SENTENCE_BREAK`'s rule). An
    unfinished last sentence counts as one: it is what the model generated."""
    sentences = []
    for line in text.splitlines():
        sentences += [s.strip() for s in _SENTENCE_BREAK.split(line) if s.strip()]
    return sentences


def summary_of(generated: str, *, sentences: int = 3) -> str:
    """The first `sentences` sentences of the generated text, one a line (ROUGE-Lsum's format)."""
    return "\n".join(split_sentences(generated)[:sentences])


# --------------------------------------------------------------------------------------------
# The prompt


def summary_prompt(
    tokenizer, article: str, suffix_ids: Sequence[int], *, room: int, truncation: str = "keep_start"
) -> tuple[list[int], bool]:
    """The prompt's ids, article then suffix, the article cut to `room - len(suffix_ids)` tokens
    (its beginning, or its end with "keep_end"), and whether it was cut. `<|endoftext|>` written in
    an article is plain text, as in every scored text of gpt2np.evaluate."""
    _check_truncation(truncation)
    keep = room - len(suffix_ids)
    if keep < 1:
        raise ValueError(f"room ({room} tokens) must exceed the suffix ({len(suffix_ids)} tokens)")
    article_ids = tokenizer.encode(article, disallowed_special=())
    cut = len(article_ids) > keep
    if cut:
        article_ids = article_ids[:keep] if truncation == "keep_start" else article_ids[len(article_ids) - keep :]
    return article_ids + list(suffix_ids), cut


def _prompt_room(model, suffix_ids: Sequence[int], max_new_tokens: int) -> int:
    """How many prompt tokens leave room for `max_new_tokens` in the context: the engine's rule,
    checked first for the suffix and one article token (a ValueError naming both numbers)."""
    n_ctx = model.config.n_ctx
    check_fits(len(suffix_ids) + 1, max_new_tokens, n_ctx, what="the summary suffix with one article token")
    return n_ctx - max_new_tokens


# --------------------------------------------------------------------------------------------
# The task


def summarize(
    model,
    examples: Iterable[SummaryExample | tuple[str, str]],
    *,
    suffix: str = PAPER_SUFFIX,
    max_new_tokens: int = 100,
    top_k: int | None = 2,
    temperature: float = 1.0,
    sentences: int = 3,
    seed: int | None = 0,
    truncation: str = "keep_start",
    use_stemmer: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """Summarise each article zero-shot and score the summaries with ROUGE (see the module's docstring).

    `examples` are `(article, highlights)` pairs. Returns a dict:
      rouge1, rouge2, rougeL, rougeLsum   mean over articles of each article's F1 (fractions)
      examples, tokens, truncated          articles, tokens generated, articles cut to fit
      articles                             per article: summary, generated text, its F1 scores,
                                           prompt tokens, whether it was cut, and the highlights
    and the method: suffix, max_new_tokens, top_k, temperature, sentences, seed, truncation,
    use_stemmer, sentence_split.
    """
    examples = [SummaryExample(*example) for example in examples]
    if not examples:
        raise ValueError("no articles to summarise")
    options = GenerationOptions(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=top_k)
    _check_summary_options(sentences, truncation)
    rouge_scorer(use_stemmer=use_stemmer)  # a missing rouge-score fails now, not after the generation
    suffix_ids = model.tokenizer.encode(suffix, disallowed_special=())
    room = _prompt_room(model, suffix_ids, max_new_tokens)
    prompts = [
        summary_prompt(model.tokenizer, ex.article, suffix_ids, room=room, truncation=truncation) for ex in examples
    ]
    generated = generate_summaries(
        model,
        [ids for ids, _ in prompts],
        options,
        row_generators(seed, len(prompts)),
        batch_size=batch_size,
        progress=progress,
    )
    summaries = [summary_of(text, sentences=sentences) for text, _ in generated]
    scores = rouge(summaries, [ex.highlights for ex in examples], use_stemmer=use_stemmer)
    articles = [
        {
            "index": i,
            "summary": summaries[i],
            "generated": generated[i][0],
            **scores[i],
            "prompt_tokens": len(prompts[i][0]),
            "new_tokens": generated[i][1],
            "truncated": prompts[i][1],
            "highlights": examples[i].highlights,
        }
        for i in range(len(examples))
    ]
    means = {name: sum(score[name] for score in scores) / len(scores) for name in ROUGE_TYPES}
    return means | {
        "examples": len(examples),
        "tokens": sum(n for _, n in generated),
        "truncated": sum(c for _, c in prompts),
        "suffix": suffix,
        "max_new_tokens": max_new_tokens,
        "top_k": top_k,
        "temperature": temperature,
        "sentences": sentences,
        "seed": seed,
        "truncation": truncation,
        "use_stemmer": use_stemmer,
        "sentence_split": "regex",
        "articles": articles,
    }


def _check_summary_options(sentences, truncation) -> None:
    if isinstance(sentences, bool) or not isinstance(sentences, int) or sentences < 1:
        raise ValueError(f"sentences must be a positive integer (the paper takes 3), got {sentences!r}")
    _check_truncation(truncation)


def _check_truncation(truncation) -> None:
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")


def generate_summaries(
    model,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    rngs,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> list[tuple[str, int]]:
    """Generate after each prompt with its own random generator, `batch_size` prompts a ragged
    batch (shortest first, so a batch pads little): per prompt, in order, the new text and its
    token count. A bar on stderr counts prompts and shows the tokens generated a second."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list = [None] * len(prompts)
    with tqdm(
        total=len(prompts), desc="cnn_dailymail", unit="article", disable=not progress, file=sys.stderr, leave=False
    ) as bar:
        rate = _TokenRate(bar)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            rows = text_rows(model, [prompts[i] for i in batch], options, [rngs[i] for i in batch])
            for stepped in run(model, rows):
                rate.step(len(stepped), finished=sum(row.done for row in rows))
            rate.step(0, finished=len(rows))
            rate.new_batch()
            for i, row in zip(batch, rows):
                results[i] = (row.text.text, len(row.new_ids))
    return results


class _TokenRate:
    """Feeds the progress bar: the articles finished, and generated tokens a second in its postfix."""

    def __init__(self, bar):
        self.bar, self.tokens, self.counted = bar, 0, 0
        self.start = time.perf_counter()

    def step(self, tokens: int, *, finished: int) -> None:
        """`tokens` more generated; `finished` rows of the current batch are done."""
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{self.tokens / elapsed if elapsed > 0 else 0.0:.1f} tok/s", refresh=False)
        self.bar.update(finished - self.counted)  # also redraws the postfix, at most 10 times a second
        self.counted = finished

    def new_batch(self) -> None:
        """A batch is done: draw the bar now (a quick batch would leave the rate undrawn)."""
        self.bar.refresh()
        self.counted = 0


# --------------------------------------------------------------------------------------------
# The command's table

_LABELS = {"rouge1": "ROUGE-1 F1", "rouge2": "ROUGE-2 F1", "rougeL": "ROUGE-L F1", "rougeLsum": "ROUGE-Lsum F1"}
_METHOD = ("suffix", "max_new_tokens", "top_k", "temperature", "sentences", "seed", "truncation", "use_stemmer")


def format_summary_table(report: dict, *, model: str = "") -> str:
    """The paper's figures (GPT-2 1.5B's and the random-3-sentences baseline's, labelled so) next
    to the measured ROUGE, x100 as the paper prints them, then the method and the counts."""
    metrics, paper = report["metrics"], report["paper"]
    rows = [("task", "metric", *paper, "measured")]
    for key, label in _LABELS.items():
        published = [f"{100 * figures[key]:.2f}" if key in figures else "-" for figures in paper.values()]
        rows.append((report["task"], label, *published, f"{100 * metrics[key]:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    method = ", ".join(f"{key}={metrics[key]!r}" if key == "suffix" else f"{key}={metrics[key]}" for key in _METHOD)
    counts = f"examples={metrics['examples']}, tokens={metrics['tokens']}, truncated={metrics['truncated']}"
    footer = [
        f"model: {model}" if model else "",
        f"data: {report['data']}",
        f"method: {method}",
        "method: the first sentences of the output (regex rule), one a line for ROUGE-Lsum; ROUGE F1 from "
        "rouge-score, averaged over articles",
        f"scored: {counts}",
        "paper: Radford et al. 2019, Table 4, GPT-2 1.5B (not this model's size), the paper's own ROUGE",
    ]
    return "\n".join(line for line in lines + footer if line)
