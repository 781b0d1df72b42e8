"""`gpt2np batch`: generate for, or score, every line of a file, resumably, on 1, N or a Ray cluster's workers.

    gpt2np batch prompts.jsonl --task generate --output out.jsonl --seed 0
    gpt2np batch corpus.txt --format text --task score --output scores.jsonl --workers 2

The driver here reads the input as a stream, cuts it into chunks of `batch_size` consecutive lines
(`chunks_to_run`; those an earlier run wrote are skipped, see `resume`) and hands them to
`gpt2np.batchwork.Worker`s: in this process, in `workers` processes (`process_results`), or in Ray
actors (gpt2np.batchray). Records come back chunk by chunk and are written in input order, one
JSON line each, each chunk flushed before the next is written. Only a bounded number of chunks is
in flight, so memory does not grow with the input (except on Ray, whose dataset holds the lines).

Resuming: the output of a run is a prefix of the input's records, in order. A run started again
with the same --output reads the records there, checks that their ids are those of the input's
first lines, drops a last line that was cut short (no newline: a kill mid-write), and appends the
rest. Nothing is lost or written twice, and each line is batched with the same lines as in an
uninterrupted run, so its record is the same to the bit.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .batchwork import FORMATS, TASKS, Job, Line, line_id
from .threads import ENVIRONMENT_VARIABLE, available_cores

EXIT_LINES_FAILED = 3  # the job ran to its end, but some lines have an "error" record


class ResumeError(ValueError):
    """An --output file that this input cannot continue."""


@dataclass
class Summary:
    """What a job did: records written by this run, those of them with an error, tokens generated or
    scored; and lines with an error in the whole output, an earlier run's included."""

    written: int = 0
    failed: int = 0
    tokens: int = 0
    failed_in_output: int = 0
    skipped: int = 0


# ---------------------------------------------------------------------------------------- input
def read_lines(stream, input_format: str) -> Iterator[Line]:
    """Lines of a binary stream, numbered from 1, each decoded on its own, so a line that is not
    UTF-8 becomes that line's error and not the job's. Blank lines of JSONL are skipped (their
    numbers still count); in plain text every line is a document."""
    for number, raw in enumerate(stream, start=1):
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        if input_format == "jsonl" and not raw.strip():
            continue
        try:
            yield Line(number, raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield Line(number, "", problem=f"line {number} is not UTF-8 text ({e.reason} at byte {e.start})")


def chunked(lines: Iterable[Line], size: int) -> Iterator[list[Line]]:
    chunk = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------- resuming
def cut_partial_line(path: Path) -> bool:
    """Truncate the file after its last newline: a last line without one was cut by a kill while it
    was written, and will be written again. True when something was cut."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            return True
    return False


def written_records(path: Path) -> Iterator[dict]:
    """The records an earlier run wrote (its complete lines), one at a time."""
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if not isinstance(record, dict) or "id" not in record:
                raise ResumeError(
                    f"{path}: line {number} is not a record gpt2np batch writes; "
                    "pass another --output, or remove the file to start again"
                )
            yield record


def resume(lines: Iterable[Line], records: Iterator[dict], input_format: str, summary: Summary) -> Iterator[Line]:
    """The input lines, those the earlier run's records cover marked `written`. The records must be
    the ids of the input's first lines, in order (a run writes in input order); else a ResumeError."""
    for line in lines:
        record = next(records, None)
        if record is None:
            yield line
            yield from lines
            return
        expected = line_id(line, input_format)
        if record["id"] != expected:
            raise ResumeError(
                f"the output's record {summary.skipped + 1} has id {json.dumps(record['id'])} but "
                f"the input's line {line.number} has id {json.dumps(expected)}: the output is not "
                "from this input; pass another --output, or remove it to start again"
            )
        summary.skipped += 1
        summary.failed_in_output += "error" in record
        yield dataclasses.replace(line, written=True)
    if next(records, None) is not None:
        raise ResumeError(
            "the output holds more records than the input has lines: it is not from this input; "
            "pass another --output, or remove it to start again"
        )


def chunks_to_run(lines: Iterable[Line], size: int, handed_out: collections.deque) -> Iterator[list[Line]]:
    """The chunks of `size` consecutive lines, counted from the input's first line whether or not an
    earlier run wrote it, so that a line is always batched with the same lines: a resumed run
    computes what an uninterrupted one would have, bit for bit. Chunks wholly written are skipped;
    a chunk partly written is run whole and its written records dropped (`write_records`). Each
    chunk handed out is remembered in `handed_out`, in order, for the writer to pair with its records."""
    for chunk in chunked(lines, size):
        if not all(line.written for line in chunk):
            handed_out.append(chunk)
            yield chunk


# ---------------------------------------------------------------------------------------- running
def local_results(job: Job, chunks: Iterable[list[Line]], model=None) -> Iterator[list[dict]]:
    """Records chunk by chunk, computed in this process by one Worker."""
    from .batchwork import Worker

    worker = Worker(job, model)
    for chunk in chunks:
        yield worker(chunk)


def process_results(job: Job, chunks: Iterable[list[Line]], workers: int) -> Iterator[list[dict]]:
    """Records chunk by chunk, in input order, computed by `workers` processes that each load the
    model once and use their share of the cores (BLAS threads = cores // workers). At most two
    chunks per worker are in flight, so the input is read only as fast as it is processed."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from . import batchwork

    pending: collections.deque = collections.deque()
    with blas_threads(max(1, available_cores() // workers)):  # set while the pool starts processes (on demand)
        pool = ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=batchwork.start_process, initargs=(job,)
        )
        try:
            for chunk in chunks:
                pending.append(pool.submit(batchwork.process_chunk, chunk))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BaseException:  # Ctrl-C, a failed chunk, a reader gone: the chunks in flight are not waited for
            stop_processes(pool)
            raise
        pool.shutdown()


def stop_processes(pool) -> None:
    """End a process pool's workers now. The executor only waits for them (until Python 3.14's
    terminate_workers), and they ignore Ctrl-C (`start_process`), so they are terminated by hand.
    Then the executor is shut down and waited for: its manager thread sees the dead workers and
    closes its wakeup pipe, so the interpreter's exit hook does not write to a pipe being closed (an
    'Exception ignored ... Bad file descriptor' traceback on stderr, seen in 1 of several runs)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)
    pool.shutdown(wait=True, cancel_futures=True)


# What each worker process reads at start: its BLAS's thread count, and its own pool's (gpt2np.threads).
BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", ENVIRONMENT_VARIABLE)


@contextlib.contextmanager
def blas_threads(n: int):
    """Set the BLAS and gpt2np thread counts for the processes started in the block (they read them
    when NumPy loads and when the model is made); this process's own, already set, are not changed."""
    saved = {name: os.environ.get(name) for name in BLAS_VARIABLES}
    os.environ.update({name: str(n) for name in BLAS_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_batch(
    job: Job,
    source,
    out,
    *,
    resume_from: Path | None = None,
    workers: int = 1,
    ray_address: str | None = None,
    model=None,
    progress: bool = True,
) -> Summary:
    """Run `job` over the lines of `source` (a binary stream) and write one JSON record per line to
    `out` (a text stream), in input order. With `resume_from` (the file `out` appends to), the lines
    it already holds are skipped. `ray_address` runs the chunks on Ray ("" for a local instance);
    else `workers` > 1 runs them in processes; else here, with `model` if given (already loaded)."""
    summary = Summary()
    lines = read_lines(source, job.input_format)
    if resume_from is not None and resume_from.exists():
        lines = resume(lines, written_records(resume_from), job.input_format, summary)
    handed_out: collections.deque = collections.deque()
    chunks = chunks_to_run(lines, job.batch_size, handed_out)
    if ray_address is not None:
        from .batchray import ray_results

        results = ray_results(job, chunks, address=ray_address, actors=workers, progress=progress)
    elif workers > 1:
        results = process_results(job, chunks, workers)
    else:
        results = local_results(job, chunks, model)
    write_records(results, handed_out, out, summary, progress=progress)
    return summary


def write_records(
    results: Iterable[list[dict]], handed_out: collections.deque, out, summary: Summary, *, progress: bool
) -> None:
    """Write each chunk's records (but those an earlier run wrote) as JSON lines in one write, then
    flush: a kill leaves whole records and at most one line cut short, which a resumed run drops."""
    from tqdm import tqdm

    started = time.monotonic()
    with tqdm(desc="lines", unit=" lines", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for records in results:
            chunk = handed_out.popleft()
            records = [r for line, r in zip(chunk, records, strict=True) if not line.written]
            out.write("".join(json.dumps(r) + "\n" for r in records))
            out.flush()
            summary.written += len(records)
            summary.failed += sum("error" in r for r in records)
            summary.tokens += sum(r.get("new_tokens", r.get("tokens", 0)) for r in records if "error" not in r)
            bar.update(len(records))
            rate = summary.tokens / max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"{rate:.1f} tokens/s", refresh=False)


# ---------------------------------------------------------------------------------------- the command
def resolve_model(name: str, *, revision: str, cache_dir: str | None, progress: bool) -> str:
    """A checkpoint folder the workers can load (`gpt2np.locate`'s rule: a folder, a bundled model,
    or the hub cache's snapshot, downloaded here once so that workers never download)."""
    from .console import load_failure
    from .locate import checkpoint_folder

    try:
        return str(checkpoint_folder(name, revision=revision, cache_dir=cache_dir, progress=progress).resolve())
    except (ValueError, OSError) as e:
        raise load_failure(name, e) from e


def build_parser(prog: str):
    from .console import (
        ArgumentParser,
        add_debug_argument,
        add_generation_arguments,
        add_hub_arguments,
        add_threads_argument,
        positive_int,
    )

    parser = ArgumentParser(
        prog=prog, allow_abbrev=False, description=DESCRIPTION, epilog=EPILOG, formatter_class=_raw_formatter()
    )
    parser.add_argument("input", metavar="INPUT", help="the input file, '-' for stdin")
    parser.add_argument("--task", required=True, choices=TASKS, help="generate text, or score texts")
    parser.add_argument(
        "--output", metavar="FILE", help="write the records to FILE, and resume from what it holds (default: stdout)"
    )
    parser.add_argument(
        "--format",
        dest="input_format",
        choices=FORMATS,
        default="jsonl",
        help="jsonl: one JSON object a line; text: one document (prompt) a line (default: jsonl)",
    )
    parser.add_argument(
        "--model",
        default="gpt2",
        metavar="NAME_OR_FOLDER",
        help="a hub repo id or a checkpoint folder (default: %(default)s)",
    )
    add_hub_arguments(parser)
    r = parser.add_argument_group("running")
    r.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        metavar="N",
        help="lines run together in one batch (default: %(default)s)",
    )
    r.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="processes, each with its share of the cores; with --ray, actors (default: 1; with --ray, "
        "one per CPU of the cluster)",
    )
    r.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster at ADDRESS, or a local Ray instance without one (pip install 'gpt2np[ray]')",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr (default: show them)")
    add_threads_argument(r, default="the worker's share of the cores")
    add_debug_argument(r)
    g = parser.add_argument_group('generate (a line\'s "params" override these)')
    add_generation_arguments(g)
    s = parser.add_argument_group("score (as gpt2np.evaluate.perplexity)")
    s.add_argument("--max-length", type=positive_int, metavar="N", help="window length (default: the context)")
    s.add_argument("--stride", type=positive_int, metavar="N", help="how far a window moves (default: 512)")
    s.add_argument("--prepend-eot", action="store_true", help="score each text after <|endoftext|> (default: no)")
    return parser


def _raw_formatter():
    import argparse

    return argparse.RawDescriptionHelpFormatter


DESCRIPTION = "Generate for, or score, every line of a file; one JSON record per line, in input order."
EPILOG = """\
input lines (--format jsonl):
  generate: {"id": "a", "prompt": "Once upon a time", "params": {"max_new_tokens": 20, "seed": 1}}
  score:    {"id": "a", "text": "A document to score."}
  "id" is optional (default: the line number); "params" are the model card endpoint's.
output records:
  generate: {"id": ..., "text": continuation, "new_tokens": n, "finish_reason": "stop"|"length"|"eos"}
  score:    {"id": ..., "tokens": n, "logprob_sum": x, "ppl": x, "bits_per_byte": x}
  a line that cannot be run: {"id": ..., "error": "what is wrong"}
seeds:
  line n draws from --seed's (n-1)-th child, or from its own params.seed, whatever the batch or workers.
exit status:
  0 every line done, 3 some lines have an error record, 2 bad input (a flag, the model, an output
  file that is not this input's), 130 interrupted (run again with the same --output to resume).
"""


def make_job(args, model_folder: str) -> Job:
    from .console import UsageError, option_kwargs
    from .request import RequestError, check_params

    defaults = dict(option_kwargs(args), return_full_text=False)
    try:
        check_params({}, defaults=defaults)
    except RequestError as e:
        raise UsageError(str(e)) from e
    return Job(
        task=args.task,
        model=model_folder,
        input_format=args.input_format,
        defaults=defaults,
        seed=args.seed,
        max_length=args.max_length,
        stride=args.stride,
        prepend_eot=args.prepend_eot,
        batch_size=args.batch_size,
        threads=args.threads,
    )


def open_input(path: str):
    from .console import UsageError

    if path == "-":
        if sys.stdin is None:
            raise UsageError("there is no stdin to read; pass an INPUT file")
        return contextlib.nullcontext(sys.stdin.buffer)
    try:
        return open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}; pass an input file, or - for stdin") from e


def open_output(path: str | None):
    """stdout, or FILE opened to append after its last complete line (a cut-short line is dropped)."""
    from .console import UsageError

    if path is None:
        return contextlib.nullcontext(sys.stdout)
    try:
        if Path(path).exists():
            cut_partial_line(Path(path))
        return open(path, "a", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write --output {path}: {e.strerror}") from e


def command(argv: list[str], prog: str) -> int:
    from .batchwork import ModelLoadError
    from .console import UsageError, check_ctrl_c, note, require_stdout

    args = build_parser(prog).parse_args(argv)
    if args.output is None:
        require_stdout()
    if args.ray is not None and importlib.util.find_spec("ray") is None:
        raise UsageError('--ray needs Ray Data, which is not installed: pip install "gpt2np[ray]"')
    folder = resolve_model(args.model, revision=args.revision, cache_dir=args.cache_dir, progress=not args.quiet)
    job = make_job(args, folder)
    check_ctrl_c()
    with open_input(args.input) as source, open_output(args.output) as out:
        try:
            summary = run_batch(
                job,
                source,
                out,
                resume_from=Path(args.output) if args.output else None,
                workers=args.workers,
                ray_address=args.ray,
                progress=not args.quiet,
            )
        except (ResumeError, ModelLoadError) as e:
            raise UsageError(str(e)) from e
    failed = summary.failed + summary.failed_in_output
    if failed and not args.quiet:
        note(prog, f'{failed} line{"s" if failed != 1 else ""} failed: their records carry an "error"')
    return EXIT_LINES_FAILED if failed else 0


def main(argv=None, *, prog: str = "gpt2np batch") -> int:
    """Run `gpt2np batch` and return its exit status (gpt2np.console's convention, and 3 when lines failed)."""
    from .console import run, wants_debug

    argv = list(sys.argv[1:] if argv is None else argv)
    return run(lambda: command(argv, prog), prog=prog, debug=wants_debug(argv))
