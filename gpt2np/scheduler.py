"""The scheduler: one worker thread steps one `Engine` for every accepted job (gpt2np.jobs).

Routes parse and check a request, make a job and `submit` it; the worker decodes every prompt of
every running job in one batch, one token per row per step (continuous batching, as TGI and vLLM do
it): between two steps, jobs that arrived meanwhile are prefilled and join the batch, and rows that
finished leave it. Twelve clients therefore share the cost of reading the weights at every step
instead of waiting in line.

Every row keeps its own options and random generator (row i of a request draws from the i-th
child of the request's seed, as in `GPT2.generate`), so a request's text does not depend on who
shared its batch, up to float32 rounding: BLAS may round a row's matrix products differently for
different batch sizes and padding (differences near 1e-6), which flips a greedy choice only
between two logits tied to that precision, and a seeded draw when its random number falls that
close to a boundary. Each job says which case it is in: `shared` is False when no other job's rows
shared a pass with its rows (the same request alone gives the same bytes again).

It speaks in jobs and `JobError`s only: `submit` raises `QueueFull` or `ShuttingDown`, a failure
inside fails the jobs it touched with `InternalFailure`. What a client is told is the front end's
business (gpt2np.httperrors for HTTP).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import NamedTuple

import numpy as np

from .engine import Engine
from .jobs import InternalFailure, Job, JobRow, QueueFull, ShuttingDown

DEFAULT_MAX_BATCH_SIZE = 16  # prompts (rows) decoded together
DEFAULT_MAX_QUEUE = 64  # requests waiting for a place in the batch
DEFAULT_PREFILL_CHUNK = 128  # prompt tokens prefilled per decoding step


class Load(NamedTuple):
    """What the scheduler holds at one moment."""

    jobs_waiting: int  # accepted jobs with rows not yet in the batch
    rows_waiting: int  # their rows that are not in the batch yet
    rows_running: int  # rows in the batch: decoding, or being prefilled a chunk per step


def mark_shared(jobs: set[Job]) -> None:
    """Jobs whose rows run in one pass may round differently than alone (see the module's docstring)."""
    if len(jobs) > 1:
        for job in jobs:
            job.shared = True


class Scheduler:
    """Owns the model: one worker thread decodes every accepted job in one batch.

    At each step the worker admits rows of waiting jobs while the batch has room, one row at a time
    to the job with the fewest rows in the batch (the oldest first on ties), and no job more than
    `job_rows` rows, so that a request with many prompts leaves room for the next ones instead of
    holding the batch until its last prompt is done. Then it chooses one token for every row and
    feeds the tokens back in one forward pass; long prompts are prefilled a chunk per step
    (`prefill_chunk`, see gpt2np.engine), so they delay the rows decoding by a chunk, not by
    their whole prefill.
    """

    def __init__(
        self, model, *, max_batch_size: int, max_queue: int, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    ):
        self.model, self.max_batch_size, self.max_queue = model, max_batch_size, max_queue
        self.job_rows = max_batch_size - max_batch_size // 4  # the most rows one job may hold in the batch
        self.prefill_chunk = prefill_chunk
        self.engine = Engine(model, prefill_chunk=prefill_chunk)
        self.generated_tokens = 0  # tokens chosen so far, every job's (written by the worker only)
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="gpt2np-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; `ShuttingDown` once closing, `QueueFull` with `max_queue` jobs waiting."""
        with self._cond:
            if self._closing:
                raise ShuttingDown()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.max_queue)
            job.submitted_at = time.monotonic()
            self._waiting.append(job)
            self._cond.notify()

    def close(self) -> None:
        """Refuse new jobs; the worker ends once every accepted job has finished."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    @property
    def closing(self) -> bool:
        return self._closing

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def depth(self) -> tuple[int, int]:
        """(requests waiting, prompt rows decoding)."""
        load = self.load()
        return load.jobs_waiting, load.rows_running

    def load(self) -> Load:
        with self._cond:
            waiting = [job for job in self._waiting if not job.closed]
            rows_waiting = sum(len(job.rows) - job.n_admitted for job in waiting)
            return Load(len(waiting), rows_waiting, len(self.engine.rows) + len(self.engine.waiting))

    def _run(self) -> None:
        """The worker: NumPy's floating-point warnings are off here (overflows in the sampler are
        taken in the limit), so that none reaches the log as multi-line noise."""
        with np.errstate(all="ignore"):
            while (groups := self._admit()) is not None:
                self._join(groups)
                if self.engine.busy:
                    self._step_or_fail()

    def _step_or_fail(self) -> None:
        try:
            self.step()
        except Exception as e:  # cannot tell whose row failed: all of them
            for job in {row.job for row in self.engine.rows + self.engine.waiting}:
                job.fail(InternalFailure(e))
            self.engine = Engine(self.model, prefill_chunk=self.prefill_chunk)

    def _admit(self) -> list[list[JobRow]] | None:
        """Rows of waiting jobs that fit in the batch, grouped by job; blocks while there is nothing
        to do, and gives None once closing with nothing left."""
        with self._cond:
            while not self._waiting and not self.engine.busy:
                if self._closing:
                    return None
                self._cond.wait()
            self._waiting = deque(job for job in self._waiting if not job.closed)  # timed out while waiting
            held = Counter(row.job for row in self.engine.rows + self.engine.waiting if not row.done)
            picked: Counter[Job] = Counter()
            for _ in range(self.max_batch_size - sum(held.values())):
                job = self._next_job(held, picked)
                if job is None:
                    break
                held[job] += 1
                picked[job] += 1
            return [self._take_rows(job, n) for job, n in picked.items()]

    def _next_job(self, held: Counter, picked: Counter) -> Job | None:
        """The waiting job that gets the next free row: of those with rows left and fewer than
        `job_rows` in the batch, the one with the fewest there, the oldest on ties."""
        candidates = (job for job in self._waiting if job.n_admitted + picked[job] < len(job.rows))
        return min((job for job in candidates if held[job] < self.job_rows), key=lambda job: held[job], default=None)

    def _take_rows(self, job: Job, n: int) -> list[JobRow]:
        rows = job.rows[job.n_admitted : job.n_admitted + n]
        job.n_admitted += n
        if job.n_admitted == len(job.rows):
            self._waiting.remove(job)
        return rows

    def _join(self, groups: list[list[JobRow]]) -> None:
        """Prefill newly admitted rows and add them to the batch: all in one pass (the weights are read
        once) unless left padding would more than double the work; one pass per job if that fails,
        so that only the job that fails gets the failure."""
        rows = [row for group in groups for row in group]
        lengths = [len(row.ids) for row in rows]
        if len(groups) > 1 and len(rows) * max(lengths) <= 2 * sum(lengths):
            try:
                self.engine.add(rows)
                mark_shared({row.job for row in rows})
                return
            except Exception:  # retried job by job below
                pass
        for group in groups:
            try:
                self.engine.add(group)
            except Exception as e:  # this job fails, the others go on
                group[0].job.fail(InternalFailure(e))

    def step(self) -> None:
        """One token for every row of the batch: choose, settle the rows that finished (their job
        answers once all its rows have), feed the rest. Called by the worker thread only."""
        engine = self.engine
        for row in engine.rows + engine.waiting:
            if row.job.closed:  # failed or timed out: its rows leave the batch
                row.finish()
        mark_shared({row.job for row in engine.rows if not row.done})
        chosen = engine.choose()  # each row takes its tokens (JobRow.accept: its text; a stop string finishes it)
        now = time.monotonic()
        for row, _ in chosen:
            if row.first_token_at is None:
                row.first_token_at = now
            row.last_token_at = now
        self.generated_tokens += len(chosen)
        for row in engine.rows:
            if row.done and not row.settled and not row.job.closed:
                row.settled = True
                row.job.row_finished()
        engine.forward()
