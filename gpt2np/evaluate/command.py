"""`gpt2np eval` and scripts/evaluate.py: run one task, print the model card's figure beside the
measured one (or the whole report as JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..scoring import DEFAULT_BATCH_SIZE
from .data import DETOKENIZERS
from .summaries import format_summary_table
from .tasks import TASKS, evaluate_task

# --------------------------------------------------------------------------------------------
# The command: `gpt2np eval` and scripts/evaluate.py


def format_table(report: dict, *, model: str = "") -> str:
    """The model card's figures next to the measured ones, one row per metric."""
    spec = TASKS[report["task"]]
    if spec.kind == "summaries":
        return format_summary_table(report, model=model)
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
        published = "-" if card is None else f"{100 * card:.2f}" if percent else f"{card:.2f}"
        rows.append((spec.name, shown, published, value))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    method = ", ".join(f"{k}={v}" for k, v in metrics.items() if k in _METHOD_KEYS and v is not None)
    counts = ", ".join(f"{k}={v}" for k, v in metrics.items() if k in ("tokens", "examples", "lines", "words", "bytes"))
    footer = [
        f"model: {model}" if model else "",
        f"data: {report['data']}",
        f"method: {method}",
        f"method: {spec.note}" if spec.note else "",
        f"scored: {counts}",
    ]
    return "\n".join(lines + [line for line in footer if line])


_METHOD_KEYS = ("max_length", "stride", "prepend_eot", "eos", "detokenizer", "limit")


def build_parser(prog: str = "gpt2np eval") -> argparse.ArgumentParser:
    from ..console import (
        ArgumentParser,
        add_debug_argument,
        add_threads_argument,
        stop_text,
    )  # a bad flag is one line, as everywhere

    parser = ArgumentParser(
        prog=prog,
        description="Zero-shot evaluation of a GPT-2 checkpoint on a task of the GPT-2 model card's table; "
        "prints the model card's figure next to the measured one. Methods: docs/evaluation.md.",
    )
    parser.add_argument("--model", default="gpt2", help="checkpoint folder or hub name (default: gpt2)")
    parser.add_argument("--task", required=True, choices=list(TASKS), help="which row of the table")
    parser.add_argument(
        "--data",
        help="the task's test file; without it, LAMBADA is downloaded (checksum-pinned) "
        "and the other tasks stop with the file to fetch",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--max-length", type=int, help="window length for perplexity tasks (default: the model's context)"
    )
    parser.add_argument("--stride", type=int, help="how far the window moves (default: min(512, max length))")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"windows, sequences or articles per batch (default: {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--limit",
        type=int,
        help="score only the first N examples (LAMBADA, CBT), lines (1bw), articles (cnn_dailymail) or tokens (others)",
    )
    parser.add_argument("--prepend-eot", action="store_true", help="start every text with <|endoftext|> (default: no)")
    parser.add_argument("--detokenizer", choices=list(DETOKENIZERS), help="override the task's detokenizer")
    parser.add_argument("--cache-dir", help="where downloaded test files go (default: ~/.cache/gpt2np/datasets)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_argument(parser)
    add_debug_argument(parser)
    summaries = parser.add_argument_group("cnn_dailymail (defaults: the GPT-2 paper's method)")
    summaries.add_argument(
        "--seed", type=int, default=0, help="article i samples from this seed's i-th child (default: 0)"
    )
    summaries.add_argument(
        "--suffix", type=stop_text, help="text after each article (default: '\\nTL;DR:'; \\n is understood)"
    )
    summaries.add_argument("--max-new-tokens", type=int, help="tokens generated per article (default: 100)")
    summaries.add_argument("--top-k", type=int, help="sample from the k likeliest tokens (default: 2)")
    summaries.add_argument("--sentences", type=int, help="sentences of the output kept as the summary (default: 3)")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "gpt2np eval") -> int:
    """Run the command; returns the exit status. Errors follow every gpt2np command's convention
    (gpt2np.console): one line on stderr, 2 for bad input (a flag, the model, a data file), 130 on Ctrl-C."""
    from ..console import load_model, run, wants_debug

    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = build_parser(prog).parse_args(argv)
        model = load_model(args.model, revision="main", cache_dir=None, progress=not args.quiet, threads=args.threads)
        report = evaluate_task(
            model,
            args.task,
            data=args.data,
            max_length=args.max_length,
            stride=args.stride,
            batch_size=args.batch_size,
            limit=args.limit,
            prepend_eot=args.prepend_eot,
            detokenizer=args.detokenizer,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
            seed=args.seed,
            suffix=args.suffix,
            max_new_tokens=args.max_new_tokens,
            top_k=args.top_k,
            sentences=args.sentences,
        )
        report = {"model": args.model} | report
        print(json.dumps(report, indent=2) if args.json else format_table(report, model=args.model))
        return 0

    # A data file that is missing or malformed is a ValueError or OSError from the task: bad input too.
    return run(body, prog=prog, debug=wants_debug(argv), usage_errors=(ValueError, OSError))
