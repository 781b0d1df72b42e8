"""The work of a batch job: a chunk of input lines in, one output record per line out.

`gpt2np batch` (gpt2np.batch) cuts its input into chunks of consecutive lines and hands each chunk
to a `Worker`, in this process, in worker processes, or in Ray actors (gpt2np.batchray). A worker
holds the model, loaded once from a folder, and nothing else that changes: the same chunk gives
the same records wherever it runs, so the output does not depend on how many workers there are.

- generate: each line's prompt becomes a row of one `Engine` batch (gpt2np.generation.run), with
  its own options (the job's flags, overridden by the line's "params", checked by
  gpt2np.request.check_params as the endpoint checks them) and its own random generator
  (`line_generator`: derived from the line's number, never from its batch).
- score: each line's text is scored as `gpt2np.evaluate.perplexity` scores a text, through the same
  gpt2np.scoring functions (`text_ids`, `score_texts`, `perplexity_figures`), the windows of every
  line of the chunk scored together.

A line that cannot be read or run gets a record with an "error" instead; the others are unharmed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import scoring

TASKS = ("generate", "score")
FORMATS = ("jsonl", "text")


class LineError(ValueError):
    """A line that cannot be run; its message becomes the line's "error"."""


class ModelLoadError(RuntimeError):
    """The worker's model cannot be loaded: the job cannot run at all."""


@dataclass(frozen=True)
class Job:
    """What a worker needs to turn lines into records: small and picklable (no weights), so that it
    can travel to worker processes and Ray actors, which load the model from `model` themselves."""

    task: str = "generate"
    model: str = "gpt2"  # a checkpoint folder (the driver resolves hub names to their cache folder)
    input_format: str = "jsonl"
    defaults: dict = field(default_factory=dict)  # generate: GPT2.generate's keywords (return_full_text: False)
    seed: int | None = None  # generate: line n draws from this seed's (n - 1)-th child
    max_length: int | None = None  # score: window length (default: the model's context)
    stride: int | None = None  # score: how far a window moves (default: min(512, max_length))
    prepend_eot: bool = False  # score: put <|endoftext|> before the text, so its first token is scored
    batch_size: int = 8  # lines per chunk; for score also windows per forward pass
    threads: int | None = None  # each worker's threads (gpt2np.threads); None: its share of the cores


@dataclass(frozen=True)
class Line:
    """One input line: its 1-based number in the input and its text (without the newline)."""

    number: int
    text: str
    problem: str | None = None  # why the line could not even be read as text (not UTF-8)
    written: bool = False  # an earlier run wrote its record (the line is run again only with its chunk)


# ---------------------------------------------------------------------------------------- reading a line
def read_fields(line: Line, input_format: str) -> dict:
    """The line as a JSON object (jsonl), or as {"text": line} (plain text, one document a line)."""
    if line.problem is not None:
        raise LineError(line.problem)
    if input_format == "text":
        return {"text": line.text}
    try:
        data = json.loads(line.text)
    except ValueError as e:
        raise LineError(f"line {line.number} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LineError(f"line {line.number} must be a JSON object, got {type(data).__name__}")
    return data


def line_id(line: Line, input_format: str):
    """The line's "id" when it has a usable one (a string or an integer), else its line number. The
    driver calls this to match input lines with the records of an earlier run."""
    try:
        data = read_fields(line, input_format)
    except LineError:
        return line.number
    value = data.get("id", line.number)
    return value if _is_id(value) else line.number


def _is_id(value) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def check_keys(data: dict, known: tuple[str, ...], line: Line) -> None:
    unknown = [k for k in data if k not in known]
    if unknown:
        raise LineError(f'unknown key "{unknown[0]}" in line {line.number}; a line holds {", ".join(known)}')
    if "id" in data and not _is_id(data["id"]):
        raise LineError(f"line {line.number}: id must be a string or an integer, got {json.dumps(data['id'])}")


def required_text(data: dict, key: str, line: Line) -> str:
    if key not in data:
        raise LineError(f'line {line.number} has no "{key}"')
    if not isinstance(data[key], str):
        raise LineError(f"line {line.number}: {key} must be a string, got {json.dumps(data[key])[:60]}")
    return data[key]


# ---------------------------------------------------------------------------------------- the worker
class Worker:
    """Turns chunks of lines into records with one model, loaded once."""

    def __init__(self, job: Job, model=None, *, threads=None):
        if job.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {job.task!r}")
        self.job = job
        threads = job.threads if job.threads is not None else threads  # --threads, else the caller's share
        self.model = model if model is not None else load(job.model, threads=threads)

    def __call__(self, lines: Sequence[Line]) -> list[dict]:
        """One record per line, in the lines' order."""
        if self.job.task == "generate":
            return generate_records(self.model, self.job, lines)
        return score_records(self.model, self.job, lines)


def load(folder: str, *, threads=None):
    from .api import GPT2

    try:
        return GPT2.from_pretrained(folder, progress=False, threads=threads)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"cannot load the model {folder!r}: {e}") from None


# One Worker per worker process of `gpt2np batch --workers N`: a process pool's tasks are plain
# functions, so the process keeps its worker here, made at the first chunk (a failure to load is
# then that chunk's exception, with its message, rather than a pool broken without one).
_process = {}


def start_process(job: Job) -> None:
    """A worker process's start: remember the job; Ctrl-C is the driver's to handle."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _process["job"] = job


def process_chunk(lines: Sequence[Line]) -> list[dict]:
    if "worker" not in _process:
        _process["worker"] = Worker(_process["job"])
    return _process["worker"](lines)


def error_record(line: Line, job: Job, error: Exception) -> dict:
    return {"id": line_id(line, job.input_format), "error": str(error)}


# ---------------------------------------------------------------------------------------- generate
GENERATE_KEYS = ("id", "prompt", "params")


def line_generator(job_seed: int | None, line_seed: int | None, number: int) -> np.random.Generator:
    """Line `number`'s random generator. A line's own seed gives what `GPT2.generate(prompt,
    seed=s)` gives; otherwise line n draws from the job seed's (n - 1)-th child, the generator row
    n - 1 of `GPT2.generate(all_prompts, seed=job_seed)` gets. Either way the text depends on the
    line alone, not on its batch, the number of workers or a resumed run."""
    from .sampling import row_generators

    if line_seed is not None:
        return row_generators(line_seed, 1)[0]
    if job_seed is None:
        return np.random.default_rng()
    return np.random.default_rng(np.random.SeedSequence(job_seed, spawn_key=(number - 1,)))


@dataclass
class Prepared:
    """A generate line, read and checked: its prompt's ids, options and generator."""

    line: Line
    id: object
    prompt: str
    ids: list
    options: object
    rng: np.random.Generator
    return_full_text: bool


def prepare_generate(model, job: Job, line: Line) -> Prepared:
    """Read a generate line and check it as the endpoint checks a request (gpt2np.request), and
    that its prompt fits the context with its max_new_tokens (engine.check_fits)."""
    from .engine import check_fits
    from .generation import prepare_prompts
    from .request import RequestError, check_params

    data = read_fields(line, job.input_format)
    if job.input_format == "text":
        data = {"prompt": data["text"]}
    check_keys(data, GENERATE_KEYS, line)
    prompt = required_text(data, "prompt", line)
    params = data.get("params", {})
    try:
        options, seed, full = check_params(params, defaults={"return_full_text": False, **job.defaults})
    except RequestError as e:
        raise LineError(str(e)) from None
    (ids,) = prepare_prompts(model.tokenizer, [prompt], bos=model.config.bos_token_id)
    limit = "params.max_new_tokens" if isinstance(params, dict) and "max_new_tokens" in params else "--max-new-tokens"
    try:
        check_fits(len(ids), options.max_new_tokens, model.config.n_ctx, what="the prompt", limit=limit)
    except ValueError as e:
        raise LineError(str(e)) from None
    rng = line_generator(job.seed, seed, line.number)
    return Prepared(line, data.get("id", line.number), prompt, ids, options, rng, full)


def generate_records(model, job: Job, lines: Sequence[Line]) -> list[dict]:
    """Every good line of the chunk as a row of one engine batch; a bad line gets its error."""
    from .generation import run, text_rows

    records: list = [None] * len(lines)
    ready, rows = [], []
    for i, line in enumerate(lines):
        try:
            prepared = prepare_generate(model, job, line)
        except LineError as e:
            records[i] = error_record(line, job, e)
            continue
        ready.append((i, prepared))
        rows += text_rows(model, [prepared.ids], prepared.options, [prepared.rng])
    if rows:
        for _ in run(model, rows):
            pass
    for (i, prepared), row in zip(ready, rows):
        records[i] = generate_record(prepared, row)
    return records


def generate_record(prepared: Prepared, row) -> dict:
    """A generated line's record: the continuation (after the prompt with return_full_text), how many
    tokens were generated, and why it ended: a stop string, EOS, or max_new_tokens."""
    reason = "stop" if row.finished else "eos" if row.sampler.ended else "length"
    text = prepared.prompt + row.text.text if prepared.return_full_text else row.text.text
    return {"id": prepared.id, "text": text, "new_tokens": len(row.new_ids), "finish_reason": reason}


# ---------------------------------------------------------------------------------------- score
SCORE_KEYS = ("id", "text")


def text_ids(model, job: Job, line: Line) -> list[int]:
    """The line's token ids as perplexity scores a text (gpt2np.scoring.text_ids)."""
    data = read_fields(line, job.input_format)
    check_keys(data, SCORE_KEYS, line)
    try:
        return scoring.text_ids(model.tokenizer, required_text(data, "text", line), prepend_eot=job.prepend_eot)
    except ValueError as e:
        hint = "" if job.prepend_eot else "; pass --prepend-eot to score the first token too"
        raise LineError(f"line {line.number}: {e}{hint}") from None


def score_records(model, job: Job, lines: Sequence[Line]) -> list[dict]:
    """The windows of every good line scored in shared batches (gpt2np.scoring.score_texts), each
    line's figures `perplexity`'s."""
    records: list = [None] * len(lines)
    good = {}
    for i, line in enumerate(lines):
        try:
            good[i] = text_ids(model, job, line)
        except LineError as e:
            records[i] = error_record(line, job, e)
    scored = scoring.score_texts(
        model,
        list(good.values()),
        max_length=job.max_length,
        stride=job.stride,
        batch_size=job.batch_size,
        progress=False,
    )
    for (i, ids), log_probs in zip(good.items(), scored):
        total = float(log_probs.sum())
        figures = scoring.perplexity_figures(total, len(ids) - 1, len(model.tokenizer.decode_bytes(ids[1:])))
        records[i] = {
            "id": line_id(lines[i], job.input_format),
            "tokens": figures["tokens"],
            "logprob_sum": total,
            "ppl": figures["ppl"],
            "bits_per_byte": figures["bits_per_byte"],
        }
    return records
