"""What the server's scheduler decodes: a job (one accepted request), its rows, and how a job fails.

Both of the server's APIs make jobs of this kind: `/score` (gpt2np.modelcard's `CardJob`) and
`/v1/completions` (gpt2np.completions' `CompletionJob`), so the scheduler (gpt2np.scheduler) admits,
steps and settles them all the same way. A job's outcome is set once, by whichever comes first: the
worker (every row finished, or a failure) or the request's route (its timeout, or its client gone).
`changed` is notified at every change, so a route that streams can wait for the next one.

A job that cannot be answered ends with a `JobError` that says why in the scheduler's terms (the
queue is full, the scheduler is shutting down, the time ran out, the client left, a failure inside):
no HTTP status here. The HTTP edge turns each kind into its status, headers and message in one
place (gpt2np.httperrors.http_error), and another front end can turn them into its own.
"""

from __future__ import annotations

import threading

from .engine import Row
from .generation import RowText


# ---------------------------------------------------------------------------------------- failures
class JobError(Exception):
    """Why a job was refused or ended without its answer (the kinds below)."""


class QueueFull(JobError):
    """The scheduler already holds `max_queue` waiting jobs."""

    def __init__(self, max_queue: int):
        super().__init__(f"the queue is full ({max_queue} jobs waiting)")
        self.max_queue = max_queue


class ShuttingDown(JobError):
    """The scheduler takes no new jobs: it finishes the accepted ones, then stops."""

    def __init__(self):
        super().__init__("the scheduler is shutting down")


class TimedOut(JobError):
    """The job did not finish within `seconds` of its request's arrival."""

    def __init__(self, seconds: float):
        super().__init__(f"the job did not finish within {seconds:g} s")
        self.seconds = seconds


class ClientGone(JobError):
    """The client that asked for the job left before its answer."""

    def __init__(self):
        super().__init__("the client closed the connection")


class InternalFailure(JobError):
    """Something failed inside (the engine, a bug): `cause` is the exception."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


# ---------------------------------------------------------------------------------------- jobs
class JobRow(Row):
    """One row of a job while it decodes: an engine row that knows its job and its text so far."""

    def __init__(self, job: Job, ids, options, rng, vocab_size: int, text: RowText, **row_options):
        super().__init__(ids, options, rng, vocab_size, **row_options)
        self.job, self.text = job, text
        self.settled = False  # counted by its job as finished (set by the scheduler)
        self.first_token_at: float | None = None  # time.monotonic() of its first and last new token
        self.last_token_at: float | None = None

    def accept(self, token: int) -> None:
        if self.text.add(token):  # a stop string: the row ends at this token
            self.finish()


class Job:
    """One accepted request as the scheduler sees it: its rows, how many have joined the batch,
    and the outcome its handler waits for (`done`, then `error` or the subclass's answer)."""

    def __init__(self):
        self.rows: list[JobRow] = []
        self.n_admitted = 0  # rows handed to the batch so far
        self.shared = False  # whether another job's rows ran in a pass with this job's (X-Shared-Batch)
        self.done = threading.Event()
        self.error: JobError | None = None  # why the job failed, if it did
        self.submitted_at: float | None = None  # time.monotonic() when the scheduler took it
        self.changed = threading.Condition()  # notified at every change of the job or its rows' texts
        self.changes = 0  # counted under `changed`, so a reader knows whether it has seen the last one

    @property
    def closed(self) -> bool:
        return self.done.is_set()

    @property
    def new_tokens(self) -> int:
        return sum(row.n_new for row in self.rows)

    def row_finished(self) -> None:
        """A row has settled (the scheduler marks it first); the job is done with the last one."""
        with self.changed:
            self.on_row_finished()
            if not self.done.is_set() and all(row.settled for row in self.rows):
                self.on_finished()
                self.done.set()
            self._changed()

    def fail(self, error: JobError) -> bool:
        """End the job with an error; False if it had already ended."""
        with self.changed:
            if self.done.is_set():
                return False
            self.error = error
            self.done.set()
            self._changed()
            return True

    def on_row_finished(self) -> None:
        """Called, under `changed`, each time a row settles."""

    def on_finished(self) -> None:
        """Called, under `changed`, once every row has settled (unless the job failed first)."""

    def _changed(self) -> None:
        self.changes += 1
        self.changed.notify_all()
