"""The model card's table: each task's data, method defaults and published figures, and
`evaluate_task`, which runs one of them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..scoring import DEFAULT_BATCH_SIZE
from .data import (
    LAMBADA_SOURCE,
    DataSource,
    _check_detokenizer,
    detokenize,
    download,
    read_cbt,
    read_char_test,
    read_cnn_dailymail,
    read_lambada,
    read_text,
)
from .methods import (
    _check_limit,
    cbt,
    count_words,
    lambada,
    line_perplexity,
    perplexity,
)
from .summaries import PAPER_FIGURES, summarize

# --------------------------------------------------------------------------------------------
# Tasks: the model card's table


@dataclass(frozen=True)
class Task:
    """One row group of the model card's table: how its data is read and which numbers it reports.

    `card` lists (metric key, label, GPT-2 124M's published figure, or None where the card has
    none); accuracies are fractions. `note` states the method in the command's output."""

    name: str
    kind: str  # "perplexity", "lambada", "cbt", "lines" (1BW) or "summaries" (CNN/DailyMail)
    card: tuple[tuple[str, str, float | None], ...]
    detokenizer: str = "none"
    word_units: bool = False  # report ppl_word in canonical units (words + one <eos> a line)
    char_level: bool = False  # enwik8/text8: the test split of the 100M-byte file
    source: DataSource | None = None
    data_hint: str = ""
    note: str = ""


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "lambada",
            "lambada",
            (("accuracy", "accuracy", 0.4599), ("ppl_word", "ppl (per word)", 35.13)),
            source=LAMBADA_SOURCE,
            data_hint="lambada_test.jsonl (OpenAI's LAMBADA test set, JSON lines)",
        ),
        Task(
            "cbt-cn",
            "cbt",
            (("accuracy", "accuracy", 0.8765),),
            detokenizer="cbt",
            data_hint="cbtest_CN_test_2500ex.txt from the CBT release",
        ),
        Task(
            "cbt-ne",
            "cbt",
            (("accuracy", "accuracy", 0.834),),
            detokenizer="cbt",
            data_hint="cbtest_NE_test_2500ex.txt from the CBT release",
        ),
        Task(
            "wikitext2",
            "perplexity",
            (("ppl_word", "ppl (per word)", 29.41),),
            detokenizer="wikitext",
            word_units=True,
            data_hint="wikitext-2/wiki.test.tokens from the WikiText-2 release",
        ),
        Task(
            "ptb",
            "perplexity",
            (("ppl_word", "ppl (per word)", 65.85),),
            detokenizer="ptb",
            word_units=True,
            data_hint="ptb.test.txt from Mikolov's simple-examples archive",
        ),
        Task(
            "enwik8",
            "perplexity",
            (("bits_per_byte", "bits per byte", 1.16),),
            char_level=True,
            data_hint="enwik8 (the 100,000,000-byte file inside enwik8.zip)",
        ),
        Task(
            "text8",
            "perplexity",
            (("bits_per_byte", "bits per character", 1.17),),
            char_level=True,
            data_hint="text8 (the 100,000,000-byte file inside text8.zip)",
        ),
        Task(
            "wikitext103",
            "perplexity",
            (("ppl_word", "ppl (per word)", 37.50),),
            detokenizer="wikitext",
            word_units=True,
            data_hint="wikitext-103/wiki.test.tokens from the WikiText-103 release",
        ),
    )
}
TASKS["1bw"] = Task(
    "1bw",
    "lines",
    (("ppl_word", "ppl (per word)", 75.20), ("ppl", "ppl (per token)", None)),
    detokenizer="1bw",
    word_units=True,
    data_hint="news.en.heldout-00000-of-00050 (heldout-monolingual.tokenized.shuffled in the 1BW release)",
    note="each line scored alone as <|endoftext|> + line + <|endoftext|> (the closing one for </S>); "
    "ppl_word = exp(total nll / (words + one </S> a line)), words counted in the tokenized file",
)
TASKS["text"] = Task(
    "text",
    "perplexity",
    (("ppl", "ppl (per token)", None), ("bits_per_byte", "bits per byte", None)),
    data_hint="a UTF-8 text file of your own",
    note="the file as it is (no detokenizer), scored by sliding windows",
)
TASKS["cnn_dailymail"] = Task(
    "cnn_dailymail",
    "summaries",
    (),
    data_hint="the cnn_dailymail 3.0.0 test split as JSON lines or CSV with 'article' and 'highlights' fields",
)


def evaluate_task(
    model,
    task: str,
    *,
    data: str | os.PathLike | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    prepend_eot: bool = False,
    detokenizer: str | None = None,
    cache_dir=None,
    progress: bool = True,
    seed: int | None = 0,
    **summary_options,
) -> dict:
    """Run one task of the model card's table on a data file (or LAMBADA's checked download).

    Returns `{"task", "data", "metrics", "model_card"}`: `metrics` is the result of `perplexity`,
    `lambada`, `cbt`, `line_perplexity` (1BW) or `summarize` (CNN/DailyMail); `model_card` the
    published figures under the same keys. `stride` defaults to min(512, max_length); `detokenizer`
    to the task's own; `limit` keeps the first `limit` examples (LAMBADA, CBT), lines (1BW),
    articles (CNN/DailyMail) or tokens (perplexity tasks). CNN/DailyMail adds `paper` (the GPT-2
    paper's figures) and `articles` (each summary and its scores); `seed` and `summary_options`
    (suffix, max_new_tokens, top_k, temperature, sentences, truncation; None for the default) go
    to `summarize`.
    """
    spec = _task(task)
    detokenizer = _check_detokenizer(spec.detokenizer if detokenizer is None else detokenizer)
    if limit is not None:
        _check_limit(limit)
    path = Path(data) if data is not None else _download_for(spec, cache_dir=cache_dir, progress=progress)
    report = {"task": spec.name, "data": os.fspath(path)}
    options = {key: value for key, value in summary_options.items() if value is not None}
    if spec.kind == "summaries":
        metrics = summarize(
            model, read_cnn_dailymail(path)[:limit], seed=seed, batch_size=batch_size, progress=progress, **options
        )
        articles = metrics.pop("articles")
        return report | {"metrics": metrics, "model_card": {}, "paper": PAPER_FIGURES, "articles": articles}
    if options:
        raise ValueError(f"{', '.join(options)}: options of the cnn_dailymail task only")
    if spec.kind == "lambada":
        passages = [detokenize(passage, style=detokenizer) for passage in read_lambada(path)[:limit]]
        metrics = lambada(model, passages, prepend_eot=prepend_eot, batch_size=batch_size, progress=progress)
        metrics["detokenizer"] = detokenizer
    elif spec.kind == "cbt":
        metrics = cbt(
            model,
            read_cbt(path)[:limit],
            detokenizer=detokenizer,
            prepend_eot=prepend_eot,
            batch_size=batch_size,
            progress=progress,
        )
    elif spec.kind == "lines":
        metrics = _one_billion_word(
            model,
            spec,
            path,
            detokenizer=detokenizer,
            limit=limit,
            max_length=max_length,
            stride=stride,
            batch_size=batch_size,
            progress=progress,
        )
    else:
        if spec.char_level:
            original = read_char_test(path, what=spec.data_hint)
        else:
            original = read_text(path, what=spec.data_hint)
        words = count_words(original, eos_per_line=True) if spec.word_units and limit is None else False
        metrics = perplexity(
            model,
            detokenize(original, style=detokenizer),
            max_length=max_length,
            stride=stride,
            prepend_eot=prepend_eot,
            words=words,
            limit=limit,
            batch_size=batch_size,
            progress=progress,
        )
        metrics["detokenizer"] = detokenizer
    model_card = {key: value for key, _, value in spec.card if value is not None}
    return report | {"metrics": metrics, "model_card": model_card}


def _one_billion_word(model, spec: Task, path: Path, *, detokenizer: str, limit: int | None, **options) -> dict:
    """1BW: the file's non-blank lines (the first `limit`), each scored alone (`line_perplexity`);
    words are counted in the tokenized lines, plus one </S> a line, the benchmark's own units."""
    lines = [line for line in read_text(path, what=spec.data_hint).splitlines() if line.strip()][:limit]
    words = count_words("\n".join(lines), eos_per_line=True)
    metrics = line_perplexity(
        model, [detokenize(line, style=detokenizer) for line in lines], eos=True, words=words, **options
    )
    return metrics | {"detokenizer": detokenizer, "limit": limit}


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
