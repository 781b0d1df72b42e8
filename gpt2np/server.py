"""`gpt2np serve`: a scoring endpoint in the GPT-2 model card's request format, batching clients.

Clients POST the model card's body to /score and get back a JSON list of strings, one per prompt:

    {"input_data": ["My name is John and I am", "Once upon a time,"],
     "params": {"top_p": 1.0, "temperature": 0.8, "max_new_tokens": 100, "do_sample": true,
                "return_full_text": true}}

Azure ML's shape of the same body, `{"input_data": {"input_string": [...], "parameters": {...}}}`,
is read too; gpt2np.request checks both, with the same messages as `gpt2np generate --json`.

`GET /` answers 200 `Healthy` (the liveness route of the Azure inference server) and `GET /health`
a JSON summary (model, queue depth, rows decoding).

`POST /v1/completions` is OpenAI's completions API and `GET /v1/models` lists the served model;
gpt2np.completions holds their schema and answers, and their requests join the same batch.

Standard library only: a ThreadingHTTPServer parses and validates requests in one thread per
connection and hands each accepted request (a `Job`) to the `Scheduler`, whose single worker
thread owns the model. The worker decodes every prompt of every running job in one batch, one
token per row per step (continuous batching, as TGI and vLLM do it): between two steps, jobs that
arrived meanwhile are prefilled and join the batch, and rows that finished leave it. Twelve
clients therefore share the cost of reading the weights at every step instead of waiting in line.

Every row keeps its own options and random generator (row i of a request draws from the i-th
child of the request's seed, as in `GPT2.generate`), so a request's text does not depend on who
shared its batch, up to float32 rounding: BLAS may round a row's matrix products differently for
different batch sizes and padding (differences near 1e-6), which flips a greedy choice only
between two logits tied to that precision, and a seeded draw when its random number falls that
close to a boundary. Each answer says which case it is in: `X-Shared-Batch: false` when no other
request's rows shared a pass with its rows (the same request alone gives the same bytes again).

A handler waiting for its job checks every DISCONNECT_POLL seconds that its client is still
connected; once the client has closed the connection (a client timeout, Ctrl-C in curl), the job
fails, its rows leave the batch at the next step, and no answer is written.

The library prints nothing; this server writes its own log to stderr: a start line, one line per
request (client, method, path, status, prompts, new tokens, seconds) and a stop line. A request whose
client left is logged with status 499, nginx's "client closed request"; no client ever receives it.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import warnings
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np

from .completions import NO_CHAT, CompletionError, CompletionsAPI, CompletionStream, error_body
from .console import (
    EXIT_FAILURE,
    EXIT_OK,
    ArgumentParser,
    add_debug_argument,
    add_threads_argument,
    fail,
    load_model,
    one_line,
    port_number,
    positive_float,
    positive_int,
    run,
    wants_debug,
)
from .engine import Engine, check_fits
from .generation import RowText, prepare_prompts
from .jobs import Job, JobRow
from .request import Request, RequestError, check_prompt_bytes, longest_token_bytes, parse_request
from .sampling import GenerationOptions, row_generators

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
DEFAULT_MAX_BATCH_SIZE = 16  # prompts (rows) decoded together
DEFAULT_MAX_QUEUE = 64  # requests waiting for a place in the batch
DEFAULT_TIMEOUT = 300.0  # seconds from arrival to answer
DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_MAX_PROMPTS = 256  # prompts in one request
DEFAULT_PREFILL_CHUNK = 128  # prompt tokens prefilled per decoding step
DEFAULT_READ_TIMEOUT = 30.0  # seconds to receive a whole request (request line, headers, body), or idle
DEFAULT_MAX_CONNECTIONS = 256  # open connections; more get 503 at once
WRITE_TIMEOUT = 30.0  # seconds a client may stall while its answer is written
LINGER_SECONDS = 2.0  # after an error answered before its body was read: time spent discarding the body
LINGER_BYTES = 16 << 20  # ... and at most this much of it
ACCEPT_BACKOFF = 0.1  # seconds the accept loop sleeps when the process is out of file descriptors
DISCONNECT_POLL = 0.2  # seconds between two checks that a waiting client is still connected
CLIENT_CLOSED = 499  # the log's status for a request whose client left (nginx's convention)


class HTTPError(Exception):
    """A request answered with an error status and {"error": message} (OpenAI's shape on /v1/ routes,
    with `param` and `code`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        detail: str = "",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.detail = detail  # for the server log only (the cause of a 500)
        self.param, self.code = param, code


# ---------------------------------------------------------------------------------------- requests
def check_lengths(request: Request, ids: list[list[int]], n_ctx: int, cap: int | None) -> None:
    """The longest prompt and max_new_tokens must fit the context (the one rule: engine.check_fits),
    and max_new_tokens must be within this server's cap; a 400 names whichever limit is the tighter."""
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    n, max_new_tokens, field = len(ids[longest]), request.options.max_new_tokens, request.param_field("max_new_tokens")
    if cap is not None and cap < max_new_tokens and n + cap <= n_ctx:  # lowering it to the cap would fit
        rule = f"must be at most {cap} here (this server's --max-new-tokens-cap)"
        raise HTTPError(400, f"{field} {rule}, got {max_new_tokens}")
    try:
        check_fits(n, max_new_tokens, n_ctx, what=request.prompt_field(longest), limit=field)
    except ValueError as e:
        raise HTTPError(400, str(e)) from None


def check_size(request: Request, n_ctx: int, max_token_bytes: int, max_prompts: int) -> None:
    """What can be refused before tokenizing, which costs seconds for a 300 KB word: too many prompts,
    or a prompt with more UTF-8 bytes than the context can hold (a token is at most `max_token_bytes`
    bytes, so a prompt of b bytes is at least b / max_token_bytes tokens). The finer rule, with
    max_new_tokens, needs the tokens: `check_lengths`."""
    if len(request.prompts) > max_prompts:
        raise HTTPError(
            400,
            f"{request.prompts_field} has {len(request.prompts)} prompts; this server takes at most "
            f"{max_prompts} per request (its --max-prompts): split them over several requests",
        )
    for i, prompt in enumerate(request.prompts):
        try:
            check_prompt_bytes(prompt, request.prompt_field(i), n_ctx=n_ctx, max_token_bytes=max_token_bytes)
        except RequestError as e:
            raise HTTPError(400, str(e)) from None


# ---------------------------------------------------------------------------------------- jobs
class ScoreJob(Job):
    """One accepted /score request: a row per prompt; its answer is the list of texts."""

    def __init__(
        self, prompts: list[str], ids: list[list[int]], options: GenerationOptions, seed, return_full_text: bool, model
    ):
        super().__init__()
        self.prompts, self.return_full_text = prompts, return_full_text
        rngs = row_generators(seed, len(prompts))
        vocab_size, tokenizer = model.config.vocab_size, model.tokenizer
        self.rows = [
            JobRow(self, p, options, rng, vocab_size, RowText(tokenizer, options.stop)) for p, rng in zip(ids, rngs)
        ]
        self.texts: list[str] | None = None

    def on_finished(self) -> None:
        for row in self.rows:
            row.text.close()
        texts = [row.text.text for row in self.rows]
        self.texts = [p + t for p, t in zip(self.prompts, texts)] if self.return_full_text else texts


def internal_error(e: BaseException) -> HTTPError:
    """A 500 with a short message; the exception itself goes to the server log."""
    detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    return HTTPError(500, f"internal error ({type(e).__name__}); the server log has the details", detail=detail)


def mark_shared(jobs: set[Job]) -> None:
    """Jobs whose rows run in one pass may round differently than alone (see the module's docstring)."""
    if len(jobs) > 1:
        for job in jobs:
            job.shared = True


# ---------------------------------------------------------------------------------------- batching
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
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="gpt2np-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or a 503 when the server is stopping or the queue is full."""
        with self._cond:
            if self._closing:
                raise HTTPError(
                    503,
                    "the server is shutting down; send the request again to a running server",
                    headers={"Connection": "close"},
                )
            if len(self._waiting) >= self.max_queue:
                raise HTTPError(
                    503,
                    f"the queue is full ({self.max_queue} requests waiting); retry shortly",
                    headers={"Retry-After": "1"},
                )
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
        with self._cond:
            return sum(not job.closed for job in self._waiting), len(self.engine.rows) + len(self.engine.waiting)

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
        except Exception as e:  # noqa: BLE001 - cannot tell whose row failed: all of them
            for job in {row.job for row in self.engine.rows + self.engine.waiting}:
                job.fail(internal_error(e))
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
        so that only the job that fails gets the 500."""
        rows = [row for group in groups for row in group]
        lengths = [len(row.ids) for row in rows]
        if len(groups) > 1 and len(rows) * max(lengths) <= 2 * sum(lengths):
            try:
                self.engine.add(rows)
                mark_shared({row.job for row in rows})
                return
            except Exception:  # noqa: BLE001, S110 - retried job by job below
                pass
        for group in groups:
            try:
                self.engine.add(group)
            except Exception as e:  # noqa: BLE001 - this job fails, the others go on
                group[0].job.fail(internal_error(e))

    def step(self) -> None:
        """One token for every row of the batch: choose, settle the rows that finished (their job
        answers once all its rows have), feed the rest. Called by the worker thread only."""
        engine = self.engine
        for row in engine.rows + engine.waiting:
            if row.job.closed:  # failed or timed out: its rows leave the batch
                row.finish()
        mark_shared({row.job for row in engine.rows if not row.done})
        engine.choose()  # each row takes its tokens (JobRow.accept: its text, a stop string finishes it)
        for row in engine.rows:
            if row.done and not row.settled and not row.job.closed:
                row.settled = True
                row.job.row_finished()
        engine.forward()


# ---------------------------------------------------------------------------------------- HTTP
@dataclass(frozen=True)
class Limits:
    """The limits added to the server's first ones (flags of the same names)."""

    max_prompts: int = DEFAULT_MAX_PROMPTS
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS


# poll(2) where there is one (no limit on descriptor numbers, unlike select(2)), as socketserver does.
_Selector = selectors.PollSelector if hasattr(selectors, "PollSelector") else selectors.SelectSelector


class DeadlineReader(io.RawIOBase):
    """A connection's socket as a raw stream whose reads all end by the handler's `read_deadline`:
    http.server's own timeout bounds each recv, so a client sending a byte a second never timed out."""

    def __init__(self, sock: socket.socket, handler: ScoringHandler):
        self._sock, self._handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._handler.read_deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request was not received in time")
        self._sock.settimeout(remaining)
        n = self._sock.recv_into(buffer)
        if self._handler.idle:
            self._handler.server.set_idle(self._handler, False)
        return n


def printable(text: str) -> str:
    """`text` with control characters (C0, DEL, C1) as \\xNN: a request path must not move the cursor
    or recolour the terminal that shows the log, nor split a log line in two."""
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 else c for c in text)


def public_name(model: str) -> str:
    """The model's name as /health shows it: a hub id as given, a local folder by its last component
    only (its path says how the host's disk is laid out, which is no client's business)."""
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model


class ScoringServer(ThreadingHTTPServer):
    """The HTTP side: routes, limits and the request log; generation is the scheduler's."""

    daemon_threads = True  # an idle keep-alive connection does not hold the process at exit
    request_queue_size = 128  # connections waiting to be accepted (socketserver's default is 5)

    def __init__(
        self,
        address,
        model,
        *,
        model_name: str,
        limits: Limits | None = None,
        max_batch_size=DEFAULT_MAX_BATCH_SIZE,
        max_queue=DEFAULT_MAX_QUEUE,
        timeout=DEFAULT_TIMEOUT,
        max_body_bytes=DEFAULT_MAX_BODY_BYTES,
        max_new_tokens_cap: int | None = None,
        log=sys.stderr,
    ):
        limits = limits or Limits()
        super().__init__(address, ScoringHandler)
        self.model, self.model_name = model, model_name
        self.timeout_seconds, self.max_body_bytes, self.max_new_tokens_cap = timeout, max_body_bytes, max_new_tokens_cap
        self.max_prompts, self.read_timeout = limits.max_prompts, limits.read_timeout
        self.max_connections = limits.max_connections
        self.tokenizing = threading.Lock()  # one handler tokenizes at a time: the worker shares the GIL with one
        self.scheduler = Scheduler(
            model, max_batch_size=max_batch_size, max_queue=max_queue, prefill_chunk=limits.prefill_chunk
        )
        self.scheduler.start()
        self.max_token_bytes = longest_token_bytes(model.tokenizer)
        self.completions = CompletionsAPI(
            model,
            model_name,
            max_tokens_cap=max_new_tokens_cap,
            max_prompts=limits.max_prompts,
            max_token_bytes=self.max_token_bytes,
        )
        self._log, self._log_lock = log, threading.Lock()
        self._inflight, self._idle = 0, threading.Condition()
        self._connections, self._connections_lock = 0, threading.Lock()
        self._idle_since: dict[ScoringHandler, float] = {}  # connections waiting for a request's first byte

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def log(self, line: str) -> None:
        with self._log_lock:
            print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {printable(line)}", file=self._log, flush=True)

    def log_warnings(self) -> None:
        """Python warnings (from NumPy or elsewhere) become one log line each instead of a multi-line
        message on stderr."""

        def show(message, category, filename, lineno, file=None, line=None):
            self.log(f"warning: {category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")

        warnings.showwarning = show

    # -- connections
    def get_request(self):
        """accept(), pausing ACCEPT_BACKOFF seconds when the process is out of file descriptors: the
        listening socket stays readable, and socketserver's loop would retry at once, spinning a core."""
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(ACCEPT_BACKOFF)
            raise

    def process_request(self, request, client_address):
        """Serve the connection in its own thread. When --max-connections are already open, first
        close the one idle the longest; with none idle, answer 503 and close at once."""
        with self._connections_lock:
            full = self._connections >= self.max_connections and not self._close_longest_idle()
            self._connections += not full
        if not full:
            super().process_request(request, client_address)
            return
        body = json.dumps(
            {
                "error": f"too many open connections (this server's --max-connections is "
                f"{self.max_connections}); retry shortly"
            }
        ).encode()
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.log(f"{client_address[0]} - - 503 prompts=0 new_tokens=0 0.000s error=too many open connections")
        self.shutdown_request(request)

    def set_idle(self, handler: ScoringHandler, idle: bool) -> None:
        """Note whether a connection waits for the first byte of a request (between two, kept alive)."""
        with self._connections_lock:
            handler.idle = idle
            if idle:
                self._idle_since[handler] = time.monotonic()
            else:
                self._idle_since.pop(handler, None)

    def _close_longest_idle(self) -> bool:
        """At the connection cap, make room as nginx does: close the connection idle the longest (a
        kept-alive client opens a new one when it needs one). Called with the connections lock held;
        its thread ends, and lowers the count, once it reads the end of the stream."""
        if not self._idle_since:
            return False
        handler = min(self._idle_since, key=self._idle_since.__getitem__)
        del self._idle_since[handler]
        handler.idle = False
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections -= 1

    @contextmanager
    def in_flight(self):
        """Count a request from its arrival until its answer is written (or its client has left)."""
        with self._idle:
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def stop_gracefully(self, answer_timeout: float = 10.0) -> None:
        """Refuse new requests, finish the accepted ones, write their answers, close."""
        self.scheduler.close()  # /score on open connections now answers 503
        self.shutdown()  # the accept loop ends...
        self.server_close()  # ...and the socket closes: new connections are refused
        self.scheduler.join()  # every accepted job finished (or timed out)
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=answer_timeout)


class ScoringHandler(BaseHTTPRequestHandler):
    """Routes: POST /score, GET /, GET /health. Every answer is logged in one line."""

    server: ScoringServer
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "gpt2np"
    timeout = WRITE_TIMEOUT  # reads end by `read_deadline` instead (DeadlineReader)

    ROUTES = {
        ("POST", "/score"): "score",
        ("GET", "/"): "liveness",
        ("GET", "/health"): "health",
        ("POST", "/v1/completions"): "completions",
        ("GET", "/v1/models"): "models",
        ("POST", "/v1/chat/completions"): "chat_completions",
        ("HEAD", "/"): "liveness",
        ("HEAD", "/health"): "health",
    }

    def version_string(self) -> str:
        """The Server header: gpt2np, without http.server's Python version."""
        return self.server_version

    def setup(self) -> None:
        """Read through a DeadlineReader: one deadline for the whole of each request."""
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, self))
        self.read_deadline = time.monotonic() + self.server.read_timeout
        self._probed = self._responded = False
        self.idle = False

    def send_response(self, code, message=None) -> None:
        """Note that the answer has begun: no interim 100 Continue may follow it."""
        self._responded = True
        super().send_response(code, message)

    def handle_one_request(self) -> None:
        """One request: its request line, headers and body must arrive within --read-timeout of the
        moment the server starts waiting for it (an idle keep-alive connection is closed then too)."""
        self.read_deadline = time.monotonic() + self.server.read_timeout
        self._probed = self._responded = False
        self.server.set_idle(self, True)
        super().handle_one_request()

    def finish(self) -> None:
        self.server.set_idle(self, False)
        super().finish()

    # -- dispatch
    def do_GET(self):
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _serve(self) -> None:
        self._begin()
        with self.server.in_flight():  # a graceful stop waits until the answer is written
            try:
                answer = getattr(self, self._route())()
            except HTTPError as e:
                self._reply_error(e)
                return
            except Exception as e:  # noqa: BLE001 - answer 500 and keep serving
                self._reply_error(internal_error(e))
                return
            if answer is not None:  # None: the route has written its answer (a stream)
                self._reply(*answer)

    def _begin(self) -> None:
        """Start the figures of this request's log line."""
        self._started = time.monotonic()
        self._prompts = self._new_tokens = 0
        self._body_read = False

    def _route(self) -> str:
        path = urlsplit(self.path).path
        name = self.ROUTES.get((self.command, path))
        if name:
            return name
        allowed = [method for method, route in self.ROUTES if route == path]
        if allowed:
            raise HTTPError(
                405,
                f"{self.command} {path} is not allowed; use {' or '.join(allowed)} {path}",
                headers={"Allow": ", ".join(allowed)},
            )
        raise HTTPError(
            404,
            f"no route {self.command} {path}; the routes are POST /score, GET /, GET /health, "
            "POST /v1/completions and GET /v1/models",
        )

    # -- routes
    def liveness(self):
        return 200, "text/plain; charset=utf-8", b"Healthy", {}

    def health(self):
        scheduler = self.server.scheduler
        waiting, rows = scheduler.depth()
        status = {
            "status": "stopping" if scheduler.closing else "ok",
            "model": self.server.model_name,
            "queue_depth": waiting,
            "batch_rows": rows,
            "max_batch_size": scheduler.max_batch_size,
        }
        return 200, "application/json", json.dumps(status).encode(), {}

    def score(self):
        try:
            request = parse_request(self._read_body())  # the model card's format, flat or Azure ML's
        except RequestError as e:
            raise HTTPError(400, str(e)) from None
        model, prompts = self.server.model, request.prompts
        self._prompts = len(prompts)
        check_size(request, model.config.n_ctx, self.server.max_token_bytes, self.server.max_prompts)
        with self.server.tokenizing:
            ids = prepare_prompts(model.tokenizer, prompts, bos=model.config.bos_token_id)
        check_lengths(request, ids, model.config.n_ctx, self.server.max_new_tokens_cap)
        job = ScoreJob(prompts, ids, request.options, request.seed, request.return_full_text, model)
        self.server.scheduler.submit(job)
        self._wait_for(job)
        self._new_tokens = job.new_tokens
        if job.error is not None:
            raise job.error
        shared = {"X-Shared-Batch": "true" if job.shared else "false"}
        return 200, "application/json", json.dumps(job.texts, ensure_ascii=False).encode("utf-8"), shared

    # -- OpenAI's API (gpt2np.completions holds its schema and answers)
    def models(self):
        return 200, "application/json", json.dumps(self.server.completions.models()).encode(), {}

    def chat_completions(self):
        raise HTTPError(404, NO_CHAT, code="chat_not_supported")

    def completions(self):
        api = self.server.completions
        body = self._read_body()
        try:
            with self.server.tokenizing:  # parsing tokenizes the prompts: one handler at a time
                request = api.parse(body)
        except CompletionError as e:
            raise HTTPError(e.status, e.message, param=e.param, code=e.code) from None
        self._prompts = len(request.prompts) * request.n
        parts = api.prompt_parts(request)
        job = api.job(request)
        if job is not None:
            self.server.scheduler.submit(job)
        if request.stream:
            return self._stream(api.stream(request, job, parts))
        if job is not None:
            self._wait_for(job)
            self._new_tokens = job.new_tokens
            if job.error is not None:
                raise job.error
        answer = api.answer(request, job, parts)
        return 200, "application/json", json.dumps(answer, ensure_ascii=False).encode("utf-8"), {}

    def _stream(self, stream: CompletionStream) -> None:
        """Write a completion as server-sent events while it decodes, then close the connection (the
        end of the body). A client that leaves fails the job (its rows leave the batch); past
        --timeout the stream ends with an error event."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        status, job, deadline = 200, stream.job, self._started + self.server.timeout_seconds
        try:
            self.wfile.write(stream.open())
            with _Selector() as selector:
                selector.register(self.connection, selectors.EVENT_READ)
                while not stream.ended:
                    stream.wait(DISCONNECT_POLL)
                    self.wfile.write(stream.take())
                    if stream.ended:
                        break
                    if time.monotonic() >= deadline and job.fail(HTTPError(504, "timeout")):
                        status, limit = 504, self.server.timeout_seconds
                        self.wfile.write(stream.fail(504, f"the request did not finish within {limit:g} s (--timeout)"))
                    elif self._client_gone(selector):
                        raise ConnectionResetError
            self.wfile.write(stream.close())
        except OSError:  # the client went away
            status = CLIENT_CLOSED
            if job is not None:
                job.fail(HTTPError(CLIENT_CLOSED, "the client closed the connection"))
        self._new_tokens = 0 if job is None else job.new_tokens
        self._log_request(status, "the client closed the connection" if status == CLIENT_CLOSED else "")

    def _wait_for(self, job: Job) -> None:
        """Wait until the job has its outcome; fail it with a 504 after --timeout, or with a 499 as soon
        as the client has closed the connection (checked every DISCONNECT_POLL seconds)."""
        timeout = self.server.timeout_seconds
        deadline = time.monotonic() + timeout
        with _Selector() as selector:
            selector.register(self.connection, selectors.EVENT_READ)
            while not job.done.wait(min(DISCONNECT_POLL, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    job.fail(
                        HTTPError(
                            504,
                            f"the request did not finish within {timeout:g} s (the server's "
                            "--timeout); ask for fewer prompts or max_new_tokens",
                        )
                    )
                elif self._client_gone(selector):
                    job.fail(HTTPError(CLIENT_CLOSED, "the client closed the connection"))

    def _client_gone(self, selector: selectors.BaseSelector) -> bool:
        """Whether the client closed or reset the connection: it is readable and at its end. Bytes
        waiting there (a pipelined next request) are only peeked at, and mean the client is still on."""
        if not selector.select(0):
            return False
        try:
            if self.connection.recv(1, socket.MSG_PEEK) != b"":
                return False
        except OSError:  # ConnectionResetError and the like
            return True
        return not self._may_be_half_closed()

    def _may_be_half_closed(self) -> bool:
        """At the end of the client's stream: a client that closed its socket, or one that only shut
        down its sending side and still waits for the answer. TCP cannot tell them apart until
        something is written, so an HTTP/1.1 client is sent an interim `100 Continue` (which every
        HTTP/1.1 client must skip): a closed socket answers it with a reset, which the next check
        sees (as a pending socket error: reading at the end of the stream does not report it); a
        half-closed one reads it later, before its answer. HTTP/1.0 has no interim answers: its client
        is taken at its word and waited for."""
        if self._probed:
            return self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        if self.request_version != "HTTP/1.1" or self._responded:  # a stream: its own writes will tell
            return True
        self._probed = True
        try:
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError:
            return False
        return True

    # -- request body
    def _check_headers(self) -> int:
        """Content-Type and Content-Length of a /score request (before reading the body): its length."""
        if len({value.strip() for value in self.headers.get_all("Content-Length", [])}) > 1:
            raise HTTPError(
                400, "the request has Content-Length headers that disagree; send one", headers={"Connection": "close"}
            )
        content_type = self.headers.get("Content-Type")
        if content_type is None or self.headers.get_content_type() != "application/json":
            raise HTTPError(
                415,
                f"Content-Type must be application/json, got {content_type or 'none'}; "
                "send the header Content-Type: application/json",
            )
        if self.headers.get_content_charset(failobj="utf-8").lower() not in ("utf-8", "utf8"):
            raise HTTPError(
                415, "JSON bodies must be UTF-8; send Content-Type: application/json without another charset"
            )
        if "Transfer-Encoding" in self.headers:
            raise HTTPError(411, "chunked bodies are not supported; send a Content-Length")
        if "Content-Length" not in self.headers:
            raise HTTPError(411, "the request has no Content-Length; send the body's size in bytes as Content-Length")
        text = self.headers["Content-Length"]
        if not (text.strip().isascii() and text.strip().isdigit()):
            raise HTTPError(400, f"Content-Length must be a non-negative integer, got {text!r}")
        length = int(text)
        if length > self.server.max_body_bytes:
            raise HTTPError(
                413,
                f"the body is {length} bytes; this server takes at most {self.server.max_body_bytes} "
                "(its --max-body-bytes): send fewer prompts per request",
            )
        return length

    def _read_body(self) -> bytes:
        """The body, which must arrive by the request's read deadline (else 408). A UTF-8 byte order
        mark at its start is dropped: JSON senders must not write one, but some do (RFC 8259 lets
        readers ignore it)."""
        length = self._check_headers()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise HTTPError(
                408,
                f"the request was not received within {self.server.read_timeout:g} s (this server's "
                "--read-timeout); send the whole request at once",
                headers={"Connection": "close"},
            )
        if len(body) < length:
            raise HTTPError(400, f"the body ended after {len(body)} of the {length} bytes its Content-Length announced")
        self._body_read = True
        self.connection.settimeout(WRITE_TIMEOUT)  # not what was left of the read deadline
        return body.removeprefix(b"\xef\xbb\xbf")

    def _may_have_unread_body(self) -> bool:
        if getattr(self, "_body_read", False) or getattr(self, "headers", None) is None:
            return False
        return "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0").strip() not in ("", "0")

    def handle_expect_100(self):
        """A client that asks before sending its body (curl does for large ones) hears the 404, 405,
        411, 413 or 415 before sending it, instead of a 100 Continue."""
        try:
            if self._route() in ("score", "completions"):
                self._check_headers()
        except HTTPError as e:
            self._begin()
            self._reply_error(e)
            return False
        return super().handle_expect_100()

    # -- answers
    def _reply_error(self, error: HTTPError) -> None:
        if error.status == CLIENT_CLOSED:  # nobody left to answer: log the request and hang up
            self.close_connection = True
            self._log_request(error.status, error.detail or error.message)
            return
        body = {"error": error.message}
        if urlsplit(getattr(self, "path", "") or "").path.startswith("/v1/"):  # OpenAI's clients read their shape
            body = error_body(error.status, error.message, error.param, error.code)
        self._reply(error.status, "application/json", json.dumps(body).encode(), error.headers, detail=error.detail)

    def _reply(self, status: int, content_type: str, body: bytes, headers: dict[str, str], *, detail: str = "") -> None:
        unread = self._may_have_unread_body()
        if headers.get("Connection") == "close" or unread:
            self.close_connection = True  # an unread body would be taken for the next request
        try:
            self.connection.settimeout(WRITE_TIMEOUT)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                if name != "Connection":
                    self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client went away; the log still says what it was sent
            self.close_connection = True
        self._log_request(status, detail)
        if unread and status != 408:  # a client stalled mid-body would only make us wait
            self._discard_unread_body()

    def _discard_unread_body(self) -> None:
        """Close as nginx's lingering close does: stop sending, then read and drop what the client still
        sends (at most LINGER_BYTES, for LINGER_SECONDS). Closing with its body unread would reset the
        connection, and a client still writing that body (urllib, http.client) would see a broken pipe
        instead of the 413 waiting for it."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline, left = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                chunk = self.connection.recv(min(65536, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _log_request(self, status: int, detail: str = "") -> None:
        seconds = time.monotonic() - getattr(self, "_started", time.monotonic())
        path = urlsplit(getattr(self, "path", "") or "").path or "-"
        prompts, new_tokens = getattr(self, "_prompts", 0), getattr(self, "_new_tokens", 0)
        line = (
            f"{self.client_address[0]} {self.command or '-'} {path} {status} "
            f"prompts={prompts} new_tokens={new_tokens} {seconds:.3f}s"
        )
        self.server.log(line + (f" error={detail}" if detail else ""))

    def send_error(self, code, message=None, explain=None):
        """Malformed requests (bad request line, headers too long, ...) get a JSON error too."""
        self._begin()
        self.close_connection = True
        self._reply_error(HTTPError(code, message or HTTPStatus(code).phrase))

    def log_message(self, format, *args):
        """Silence http.server's own log: `_log_request` writes one line per request instead."""


# ---------------------------------------------------------------------------------------- command line
def build_parser(prog: str = "gpt2np serve") -> argparse.ArgumentParser:
    """The flags of `gpt2np serve`; a bad one is a one-line UsageError, as in every gpt2np command."""
    parser = ArgumentParser(
        prog=prog,
        description="Serve a GPT-2 model over HTTP in the GPT-2 model card's request format: POST /score "
        '{"input_data": [prompts...], "params": {...}} -> a JSON list of strings. Requests that arrive '
        "while the model is busy join the running batch.",
    )
    parser.add_argument("--model", default="gpt2", help="checkpoint folder or hub repo id (default: gpt2)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}; 0 picks a free one"
    )
    parser.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"prompts decoded together (default: {DEFAULT_MAX_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=DEFAULT_MAX_QUEUE,
        help=f"requests that may wait before new ones get 503 (default: {DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds a request may take, waiting included, before 504 (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"larger request bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--max-new-tokens-cap",
        type=positive_int,
        default=None,
        help="largest max_new_tokens a request may ask (default: context minus prompt)",
    )
    parser.add_argument(
        "--max-prompts",
        type=positive_int,
        default=DEFAULT_MAX_PROMPTS,
        help=f"prompts one request may hold; more get 400 (default: {DEFAULT_MAX_PROMPTS})",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=DEFAULT_PREFILL_CHUNK,
        help="prompt tokens prefilled per decoding step, so that long prompts do not stall the "
        f"others (default: {DEFAULT_PREFILL_CHUNK})",
    )
    parser.add_argument(
        "--read-timeout",
        type=positive_float,
        default=DEFAULT_READ_TIMEOUT,
        help="seconds a client has to send a whole request, or may stay idle between two; a "
        f"body not received by then gets 408 (default: {DEFAULT_READ_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="open connections; past them the longest idle one is closed, or with none idle "
        f"the new one gets 503 (default: {DEFAULT_MAX_CONNECTIONS}, and at most the file "
        "descriptor limit minus 64)",
    )
    add_threads_argument(parser)
    add_debug_argument(parser)
    return parser


def serve_until_signalled(server: ScoringServer) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully; a second signal stops at once."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        server.log(
            f"serving {server.model_name} on {server.url} (POST /score, GET /, GET /health, "
            "POST /v1/completions, GET /v1/models)"
        )
        while not stop.wait(0.5):
            pass
        waiting, rows = server.scheduler.depth()
        server.log(f"stopping: refusing new requests, finishing {waiting} waiting and the {rows} prompts decoding")
        server.stop_gracefully()
        server.log("stopped")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None, *, prog: str = "gpt2np serve") -> int:
    """`gpt2np serve [flags]`: the exit status (0 after a graceful stop). Errors follow every gpt2np
    command's convention (gpt2np.console): a bad flag or model is one line on stderr and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(lambda: serve(argv, prog=prog), prog=prog, debug=wants_debug(argv))


def serve(argv: list[str], *, prog: str) -> int:
    """Load the model, listen, and serve until SIGTERM or SIGINT."""
    args = build_parser(prog).parse_args(argv)
    model = load_model(args.model, revision="main", cache_dir=None, progress=True, threads=args.threads)
    limits = Limits(
        max_prompts=args.max_prompts,
        prefill_chunk=args.prefill_chunk,
        read_timeout=args.read_timeout,
        max_connections=connection_cap(args.max_connections),
    )
    try:
        server = ScoringServer(
            (args.host, args.port),
            model,
            model_name=public_name(args.model),
            limits=limits,
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            timeout=args.timeout,
            max_body_bytes=args.max_body_bytes,
            max_new_tokens_cap=args.max_new_tokens_cap,
        )
    except OSError as e:
        message = f"cannot listen on {args.host}:{args.port}: {one_line(e)}; choose another --port"
        return fail(prog, message, EXIT_FAILURE)
    server.log_warnings()
    serve_until_signalled(server)
    return EXIT_OK


def connection_cap(wanted: int) -> int:
    """--max-connections, lowered to leave 64 file descriptors (the model's files, the log, the
    listening socket) under the process's limit: past it, accept() fails and clients wait unanswered."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return wanted
    return wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft - 64))


if __name__ == "__main__":
    sys.exit(main())
