"""`gpt2np serve`'s HTTP side: connections, parsing, limits, deadlines and the request log.

Standard library only: a ThreadingHTTPServer (`ModelServer`) reads and checks requests in one
thread per connection (`ModelHandler`) and hands each to a route of gpt2np.routes' `App`, whose
answer it writes, whole or as a stream. Everything here is about the connection: a deadline for
receiving each whole request (`DeadlineReader`), the connection cap (the connection idle the longest
is closed to make room, as nginx does), the body's headers (Content-Type, Content-Length, 100
Continue), the lingering close after an error answered before the body was read, noticing a client
that has gone (`ModelHandler.client_gone`), the graceful stop, and one log line per request.

A handler waiting for its job checks every DISCONNECT_POLL seconds that its client is still
connected; once the client has closed the connection (a client timeout, Ctrl-C in curl), the job
fails, its rows leave the batch at the next step, and no answer is written.

The library prints nothing; this server writes its own log: a start line, one line per request
(client, method, path, status, prompts, new tokens, seconds) and a stop line. A request whose client
left is logged with status 499, nginx's "client closed request"; no client ever receives it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import selectors
import socket
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from .httperrors import CLIENT_CLOSED, HTTPError, internal_error
from .metrics import OTHER_ROUTE
from .routes import (
    DEFAULT_MAX_PROMPTS,
    DEFAULT_TIMEOUT,
    DISCONNECT_POLL,
    Answer,
    App,
    Call,
    Stream,
    error_answer,
)
from .scheduler import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK

DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_READ_TIMEOUT = 30.0  # seconds to receive a whole request (request line, headers, body), or idle
DEFAULT_MAX_CONNECTIONS = 256  # open connections; more get 503 at once
WRITE_TIMEOUT = 30.0  # seconds a client may stall while its answer is written
LINGER_SECONDS = 2.0  # after an error answered before its body was read: time spent discarding the body
LINGER_BYTES = 16 << 20  # ... and at most this much of it
ACCEPT_BACKOFF = 0.1  # seconds the accept loop sleeps when the process is out of file descriptors


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

    def __init__(self, sock: socket.socket, handler: ModelHandler):
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


class ModelServer(ThreadingHTTPServer):
    """A model served over HTTP: connections, limits and the request log here, the routes in `app`
    (gpt2np.routes), generation in its scheduler. `model_name` is the name clients send as `model`,
    or several (`--served-model-name`; the first is the one /health shows)."""

    daemon_threads = True  # an idle keep-alive connection does not hold the process at exit
    request_queue_size = 128  # connections waiting to be accepted (socketserver's default is 5)

    def __init__(
        self,
        address,
        model,
        *,
        model_name: str | Sequence[str],
        limits: Limits | None = None,
        max_batch_size=DEFAULT_MAX_BATCH_SIZE,
        max_queue=DEFAULT_MAX_QUEUE,
        timeout=DEFAULT_TIMEOUT,
        max_body_bytes=DEFAULT_MAX_BODY_BYTES,
        max_new_tokens_cap: int | None = None,
        log=sys.stderr,
    ):
        limits = limits or Limits()
        super().__init__(address, ModelHandler)
        try:
            self.app = App(
                model,
                model_name,
                max_batch_size=max_batch_size,
                max_queue=max_queue,
                prefill_chunk=limits.prefill_chunk,
                timeout=timeout,
                max_new_tokens_cap=max_new_tokens_cap,
                max_prompts=limits.max_prompts,
            )
        except BaseException:  # no name, say: the listening socket must not stay open
            self.server_close()
            raise
        self.app.start()
        self.model, self.model_name, self.scheduler = model, self.app.model_name, self.app.scheduler
        self.timeout_seconds, self.max_body_bytes = timeout, max_body_bytes
        self.read_timeout, self.max_connections = limits.read_timeout, limits.max_connections
        self._log, self._log_lock = log, threading.Lock()
        self._inflight, self._idle = 0, threading.Condition()
        self._connections, self._connections_lock = 0, threading.Lock()
        self._idle_since: dict[ModelHandler, float] = {}  # connections waiting for a request's first byte

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
        self.app.metrics.request(OTHER_ROUTE, 503)
        self.shutdown_request(request)

    def set_idle(self, handler: ModelHandler, idle: bool) -> None:
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


class ModelHandler(BaseHTTPRequestHandler):
    """One connection: each request on it is read within its deadline, routed to the server's `App`,
    answered and logged in one line."""

    server: ModelServer
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "gpt2np"
    timeout = WRITE_TIMEOUT  # reads end by `read_deadline` instead (DeadlineReader)

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
        self._selector: selectors.BaseSelector | None = None
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
        if self._selector is not None:
            self._selector.close()
        super().finish()

    # -- dispatch
    def do_GET(self):
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _serve(self) -> None:
        self._begin()
        app, path = self.server.app, self._path()
        self._route_label = app.route_label(path)
        with self.server.in_flight():  # a graceful stop waits until the answer is written
            try:
                name, params = app.route(self.command, path)
                body = self._read_body() if app.takes_body(name) else b""
                self._call = Call(
                    self.command,
                    path,
                    body=body,
                    params=params,
                    started=self._started,
                    timeout=self.server.timeout_seconds,
                    client_gone=self.client_gone,
                    poll=DISCONNECT_POLL,
                )
                answer = app.serve(name, self._call)
            except Exception as e:  # the HTTP side's own refusals (404, 408, 411, 413, 415, ...), or a bug here
                answer = error_answer(path, e)
            if isinstance(answer, Stream):
                self._write_stream(answer)
            else:
                self._reply(answer)

    def _begin(self) -> None:
        """Start the figures of this request's log line."""
        self._started = time.monotonic()
        self._call: Call | None = None
        self._body_read = False
        self._route_label = OTHER_ROUTE

    def _path(self) -> str:
        return urlsplit(getattr(self, "path", "") or "").path

    # -- clients that leave
    def client_gone(self) -> bool:
        """Whether the client closed or reset the connection: it is readable and at its end. Bytes
        waiting there (a pipelined next request) are only peeked at, and mean the client is still on."""
        if self._selector is None:
            self._selector = _Selector()
            self._selector.register(self.connection, selectors.EVENT_READ)
        if not self._selector.select(0):
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
        """Content-Type and Content-Length of a request with a body (before reading it): its length."""
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
        text = self.headers["Content-Length"].strip()
        if not (text.isascii() and text.isdigit()):
            shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}..."
            raise HTTPError(400, f"Content-Length must be a non-negative integer, got {shown}")
        # Compared as digits before int() reads them: Python refuses strings of over 4,300 digits.
        digits, limit = text.lstrip("0") or "0", self.server.max_body_bytes
        if len(digits) > len(str(limit)) or int(digits) > limit:
            size = digits if len(digits) <= 40 else f"a {len(digits)}-digit number of"
            raise HTTPError(
                413,
                f"the body is {size} bytes; this server takes at most {limit} "
                "(its --max-body-bytes): send fewer prompts per request",
            )
        return int(digits)

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
            name, _ = self.server.app.route(self.command, self._path())
            if self.server.app.takes_body(name):
                self._check_headers()
        except Exception as e:  # an HTTPError, or a bug: answered (a 500) rather than a dropped connection
            self._begin()
            self._reply(error_answer(self._path(), e))
            return False
        return super().handle_expect_100()

    # -- answers
    def _reply(self, answer: Answer) -> None:
        if answer.status == CLIENT_CLOSED:  # nobody left to answer: log the request and hang up
            self.close_connection = True
            self._log_request(answer.status, answer.detail)
            return
        unread = self._may_have_unread_body()
        if answer.headers.get("Connection") == "close" or unread:
            self.close_connection = True  # an unread body would be taken for the next request
        try:
            self.connection.settimeout(WRITE_TIMEOUT)
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            for name, value in answer.headers.items():
                if name != "Connection":
                    self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)
        except OSError:  # the client went away; the log still says what it was sent
            self.close_connection = True
        self._log_request(answer.status, answer.detail)
        if unread and answer.status != 408:  # a client stalled mid-body would only make us wait
            self._discard_unread_body()

    def _write_stream(self, stream: Stream) -> None:
        """Write a stream's chunks as they come, then close the connection (the end of the body). A
        client that leaves mid-way closes the stream, which fails its job."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", stream.content_type)
        for name, value in stream.headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        detail = ""
        try:
            for chunk in stream.chunks:
                if chunk:
                    self.wfile.write(chunk)
        except OSError:  # the client went away
            stream.chunks.close()
            stream.status = CLIENT_CLOSED
        except Exception as e:  # a failure inside, after the answer began: all that can be done is to end it
            stream.chunks.close()
            stream.status, detail = 500, internal_error(e).detail
        if stream.status == CLIENT_CLOSED:
            detail = "the client closed the connection"
        self._log_request(stream.status, detail)

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
        call = getattr(self, "_call", None)
        prompts, new_tokens = (call.prompts, call.new_tokens) if call is not None else (0, 0)
        line = (
            f"{self.client_address[0]} {self.command or '-'} {self._path() or '-'} {status} "
            f"prompts={prompts} new_tokens={new_tokens} {seconds:.3f}s"
        )
        self.server.log(line + (f" error={detail}" if detail else ""))
        self.server.app.metrics.request(getattr(self, "_route_label", OTHER_ROUTE), status)

    def send_error(self, code, message=None, explain=None):
        """Malformed requests (bad request line, headers too long, ...) get a JSON error too. A request
        line that names an HTTP version http.server cannot read (`HTTP/1.99999...`) is answered in
        HTTP/1.1's framing, not HTTP/0.9's bare body, and the message quotes at most 200 characters."""
        self._begin()
        self.close_connection = True
        if self.request_version == "HTTP/0.9" and len(getattr(self, "requestline", "").split()) >= 3:
            self.request_version = "HTTP/1.1"  # it asked for a version with headers, if not one we read
        message = message or HTTPStatus(code).phrase
        message = message if len(message) <= 200 else message[:197] + "..."
        self._reply(error_answer(self._path(), HTTPError(code, message)))

    def log_message(self, format, *args):
        """Silence http.server's own log: `_log_request` writes one line per request instead."""
