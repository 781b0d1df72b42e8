"""Errors as HTTP answers them: `HTTPError`, and the one table from the scheduler's `JobError`s to a
status, headers and message (`http_error`).

Routes raise an `HTTPError` for what they refuse (a 400 naming the field, a 404); the scheduler and
the jobs speak in `JobError`s (gpt2np.jobs), which only `http_error` turns into statuses, so each of
those answers is written here once, whichever route or front end meets it.
"""

from __future__ import annotations

from .jobs import ClientGone, InternalFailure, QueueFull, ShuttingDown, TimedOut

CLIENT_CLOSED = 499  # the log's status for a request whose client left (nginx's convention); never sent


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


def http_error(error: BaseException) -> HTTPError:
    """The answer to a request that failed with `error`: a JobError's status, headers and message, an
    HTTPError as it is, anything else a 500."""
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, QueueFull):
        return HTTPError(
            503,
            f"the queue is full ({error.max_queue} requests waiting); retry shortly",
            headers={"Retry-After": "1"},
        )
    if isinstance(error, ShuttingDown):
        return HTTPError(
            503,
            "the server is shutting down; send the request again to a running server",
            headers={"Connection": "close"},
        )
    if isinstance(error, TimedOut):
        return HTTPError(
            504,
            f"the request did not finish within {error.seconds:g} s (the server's --timeout); "
            "ask for fewer prompts or max_new_tokens",
        )
    if isinstance(error, ClientGone):
        return HTTPError(CLIENT_CLOSED, "the client closed the connection")
    if isinstance(error, InternalFailure):
        return internal_error(error.cause)
    return internal_error(error)  # a failure inside, or a kind of JobError this table does not know yet


def internal_error(e: BaseException) -> HTTPError:
    """A 500 with a short message; the exception itself goes to the server log."""
    detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    return HTTPError(500, f"internal error ({type(e).__name__}); the server log has the details", detail=detail)
