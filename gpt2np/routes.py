"""The server's routes, apart from any front end: a request's method, path and body in, an `Answer`
(status, headers, body) or a `Stream` of bytes out.

`App` holds what the routes share (the model, the scheduler that decodes for all of them, the
two APIs' settings) and has one plain method per route, which gpt2np.httpd's handler calls for
`gpt2np serve`, and which another front end (a Ray Serve deployment) can call the same way:

    app = App(model, "gpt2")
    app.start()
    name, params = app.route("POST", "/score")              # an HTTPError for a 404 or 405
    call = Call("POST", "/score", body=body, params=params)
    answer = app.serve(name, call)                          # errors are answers too

A `Call` is one request as a route sees it: its body, its deadline, and how to tell that its client
has gone (`client_gone`, the front end's; never, by default); it also collects the figures of the
request's log line (prompts, new tokens). Waiting for a job is the Call's: it fails the job with
`TimedOut` past the deadline and with `ClientGone` once the client has left, so a job's rows leave
the batch at the next step whichever front end notices. The answers to every error, the
scheduler's included, come from gpt2np.httperrors.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

from .completionrequest import NO_CHAT, error_body
from .completions import CompletionsAPI, CompletionStream
from .generation import prepare_prompts
from .httperrors import CLIENT_CLOSED, HTTPError, http_error, internal_error
from .jobs import ClientGone, Job, JobError, TimedOut
from .metrics import OTHER_ROUTE, ServerMetrics
from .modelcard import CardJob, card_answer, check_lengths, check_size, parse_card_request
from .request import longest_token_bytes
from .scheduler import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK, Scheduler

DEFAULT_TIMEOUT = 300.0  # seconds from arrival to answer
DEFAULT_MAX_PROMPTS = 256  # prompts in one request
DISCONNECT_POLL = 0.2  # seconds between two checks that a waiting client is still connected

# (method, path) -> the App's method that answers it. A path ending in `{id}` matches any non-empty
# rest of the path (percent-decoded, slashes included: hub names hold one), given to the route as
# `call.params["id"]`.
ROUTES = {
    ("POST", "/score"): "card_generate",
    ("GET", "/"): "liveness",
    ("GET", "/health"): "health",
    ("POST", "/v1/completions"): "completions",
    ("GET", "/v1/models"): "models",
    ("GET", "/v1/models/{id}"): "retrieve_model",
    ("POST", "/v1/chat/completions"): "chat_completions",
    ("GET", "/metrics"): "export_metrics",
    ("HEAD", "/"): "liveness",
    ("HEAD", "/health"): "health",
}
BODY_ROUTES = ("card_generate", "completions")  # the routes that read a JSON body


@dataclass
class Answer:
    """A whole answer: its status, body and headers; `detail` goes to the server's log only."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    detail: str = ""


@dataclass
class Stream:
    """An answer written while it is made (server-sent events), with status 200 and no length: the end
    of the body is the end of `chunks`. An empty chunk is a pause in which the front end may look at
    its client; a front end that can no longer write closes `chunks` (the route's job then fails
    with ClientGone). `status` is the log's: 504 or 499 when the stream ended so."""

    chunks: Iterator[bytes]
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=lambda: {"Cache-Control": "no-cache"})
    status: int = 200


class Call:
    """One request as a route sees it: method, path (and the parts of it a route names), body; when
    it started and how long it may take; whether its client is still there; and the figures the
    route reports for the log line."""

    def __init__(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        params: dict[str, str] | None = None,
        started: float | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client_gone: Callable[[], bool] = lambda: False,
        poll: float = DISCONNECT_POLL,
    ):
        self.method, self.path, self.body, self.params = method, path, body, params or {}
        self.started = time.monotonic() if started is None else started
        self.timeout, self.deadline = timeout, self.started + timeout
        self.client_gone, self.poll = client_gone, poll
        self.prompts = self.new_tokens = 0  # for the log line

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def wait(self, job: Job) -> None:
        """Until the job has its outcome; fail it with TimedOut past the deadline, or with ClientGone
        as soon as the client has left (checked every `poll` seconds)."""
        while not job.done.wait(min(self.poll, max(0.0, self.deadline - time.monotonic()))):
            if self.expired():
                job.fail(TimedOut(self.timeout))
            elif self.client_gone():
                job.fail(ClientGone())


def match(path: str) -> tuple[str, dict[str, str]]:
    """The route pattern a path falls under (the path itself when no pattern takes it), and its parts."""
    for _, pattern in ROUTES:
        prefix = pattern.removesuffix("{id}")
        if prefix != pattern and path.startswith(prefix) and len(path) > len(prefix):
            return pattern, {"id": unquote(path[len(prefix) :])}
    return path, {}


def route_list() -> str:
    """The routes, as a 404 names them."""
    names = [f"{method} {path}" for method, path in ROUTES if method != "HEAD"]
    return ", ".join(names[:-1]) + " and " + names[-1]


class App:
    """The routes of one served model, and the scheduler that decodes for all of them."""

    def __init__(
        self,
        model,
        model_name: str | Sequence[str],
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
        timeout: float = DEFAULT_TIMEOUT,
        max_new_tokens_cap: int | None = None,
        max_prompts: int = DEFAULT_MAX_PROMPTS,
    ):
        self.model = model
        self.timeout, self.max_new_tokens_cap, self.max_prompts = timeout, max_new_tokens_cap, max_prompts
        self.scheduler = Scheduler(
            model, max_batch_size=max_batch_size, max_queue=max_queue, prefill_chunk=prefill_chunk
        )
        self.max_token_bytes = longest_token_bytes(model.tokenizer)
        self.openai = CompletionsAPI(
            model,
            model_name,
            max_tokens_cap=max_new_tokens_cap,
            max_prompts=max_prompts,
            max_token_bytes=self.max_token_bytes,
        )
        self.model_names = self.openai.model_names  # the names it is served under, once each
        self.model_name = self.model_names[0]  # the one /health shows
        self.metrics = ServerMetrics(self.scheduler)
        self.tokenizing = threading.Lock()  # one request tokenizes at a time: the worker shares the GIL with one

    def start(self) -> None:
        self.scheduler.start()

    # -- dispatch
    def route(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        """The route's name and the parts of the path it names; a 404 or 405 when none answers."""
        pattern, params = match(path)
        name = ROUTES.get((method, pattern))
        if name:
            return name, params
        allowed = [m for m, p in ROUTES if p == pattern]
        if allowed:
            raise HTTPError(
                405,
                f"{method} {path} is not allowed; use {' or '.join(allowed)} {path}",
                headers={"Allow": ", ".join(allowed)},
            )
        raise HTTPError(404, f"no route {method} {path}; the routes are {route_list()}")

    @staticmethod
    def takes_body(name: str) -> bool:
        return name in BODY_ROUTES

    @staticmethod
    def route_label(path: str) -> str:
        """The path as the metrics name it: its route's pattern, or `other` when no route has it."""
        pattern, _ = match(path)
        return pattern if any(p == pattern for _, p in ROUTES) else OTHER_ROUTE

    def serve(self, name: str, call: Call) -> Answer | Stream:
        """The route's answer; an error (the client's, the scheduler's or a failure inside) is an answer too."""
        try:
            return getattr(self, name)(call)
        except Exception as e:  # a 4xx or 5xx the route chose, or a 500 for a failure inside
            return error_answer(call.path, e)

    def _submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except JobError as e:
            raise http_error(e) from None

    # -- the model card's endpoint and the health checks
    def liveness(self, call: Call) -> Answer:
        return Answer(200, b"Healthy", "text/plain; charset=utf-8")

    def health(self, call: Call) -> Answer:
        scheduler = self.scheduler
        waiting, rows = scheduler.depth()
        status = {
            "status": "stopping" if scheduler.closing else "ok",
            "model": self.model_name,
            "queue_depth": waiting,
            "batch_rows": rows,
            "max_batch_size": scheduler.max_batch_size,
        }
        return Answer(200, json.dumps(status).encode())

    def card_generate(self, call: Call) -> Answer:
        """POST /score: generate text for each prompt (gpt2np.modelcard)."""
        request = parse_card_request(call.body)
        model, prompts = self.model, request.prompts
        call.prompts = len(prompts)
        check_size(request, model.config.n_ctx, self.max_token_bytes, self.max_prompts)
        with self.tokenizing:
            ids = prepare_prompts(model.tokenizer, prompts, bos=model.config.bos_token_id)
        check_lengths(request, ids, model.config.n_ctx, self.max_new_tokens_cap)
        job = CardJob(prompts, ids, request.options, request.seed, request.return_full_text, model)
        self._submit(job)
        self.metrics.prompts(ids)
        call.wait(job)
        self.metrics.job_ended(job)
        call.new_tokens = job.new_tokens
        if job.error is not None:
            raise http_error(job.error)
        body, headers = card_answer(job)
        return Answer(200, body, headers=headers)

    # -- OpenAI's API (gpt2np.completionrequest holds its schema, gpt2np.completions its answers)
    def models(self, call: Call) -> Answer:
        return Answer(200, json.dumps(self.openai.models()).encode())

    def retrieve_model(self, call: Call) -> Answer:
        """GET /v1/models/{id}: OpenAI's retrieve-model."""
        return Answer(200, json.dumps(self.openai.model_card(call.params["id"])).encode())

    def chat_completions(self, call: Call) -> Answer:
        raise HTTPError(404, NO_CHAT, code="chat_not_supported")

    # -- operations
    def export_metrics(self, call: Call) -> Answer:
        """GET /metrics: Prometheus' text format (gpt2np.metrics)."""
        body, content_type = self.metrics.exposition()
        return Answer(200, body, content_type)

    def completions(self, call: Call) -> Answer | Stream:
        api = self.openai
        with self.tokenizing:  # parsing tokenizes the prompts: one request at a time
            request = api.parse(call.body)
        call.prompts = len(request.prompts) * request.n
        parts = api.prompt_parts(request)
        job = api.job(request)
        if job is not None:
            self._submit(job)
        self.metrics.prompts(request.prompts)
        if request.stream:
            stream = Stream(iter(()))
            stream.chunks = self._events(api.stream(request, job, parts), call, stream)
            return stream
        if job is not None:
            call.wait(job)
            self.metrics.job_ended(job)
            call.new_tokens = job.new_tokens
            if job.error is not None:
                raise http_error(job.error)
        answer = api.answer(request, job, parts)
        return Answer(200, json.dumps(answer, ensure_ascii=False).encode("utf-8"))

    def _events(self, stream: CompletionStream, call: Call, out: Stream) -> Iterator[bytes]:
        """A completion's server-sent events while it decodes. Past the deadline the stream ends with
        an error event; a client that leaves (seen here, or by the front end closing this generator)
        fails the job, so its rows leave the batch."""
        job = stream.job
        try:
            yield stream.open()
            while not stream.ended:
                stream.wait(call.poll)
                yield stream.take()
                if stream.ended:
                    break
                if call.expired() and job.fail(TimedOut(call.timeout)):
                    out.status = 504
                    yield stream.fail(http_error(job.error))
                elif call.client_gone():
                    job.fail(ClientGone())
                    out.status = CLIENT_CLOSED
                    return
            yield stream.close()
        finally:
            if job is not None:
                if job.fail(ClientGone()):  # closed by the front end before the job ended
                    out.status = CLIENT_CLOSED
                self.metrics.job_ended(job)
                call.new_tokens = job.new_tokens


def error_answer(path: str, error: BaseException) -> Answer:
    """The answer to an error: {"error": message}, or OpenAI's shape on /v1/ routes (its clients read
    that); a 499 is logged and never sent."""
    error = error if isinstance(error, HTTPError) else internal_error(error)
    body = {"error": error.message}
    if path.startswith("/v1/"):
        body = error_body(error.status, error.message, error.param, error.code)
    detail = error.detail or (error.message if error.status == CLIENT_CLOSED else "")
    return Answer(error.status, json.dumps(body).encode(), headers=error.headers, detail=detail)
