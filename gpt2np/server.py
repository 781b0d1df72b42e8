"""`gpt2np serve`: a GPT-2 model over HTTP, the model card's endpoint and OpenAI's completions API,
with the requests of many clients batched together. This module is the command (its flags, loading
the model, listening, the graceful stop); the server itself is in rooms of its own:

- gpt2np.httpd: connections, parsing, limits, deadlines, the connection cap, the request log;
- gpt2np.routes: each route as a plain method of `App`, which another front end can call;
- gpt2np.modelcard: `POST /score`, the model card's request generating text (`CardJob`);
- gpt2np.completionrequest and gpt2np.completions: OpenAI's `POST /v1/completions` (its schema;
  `CompletionJob` and the answers) and `GET /v1/models`;
- gpt2np.scheduler and gpt2np.jobs: one worker thread stepping one `Engine` for every job;
- gpt2np.httperrors: `HTTPError` and the one table from the scheduler's errors to statuses.

    gpt2np serve --model gpt2 --port 5001        # or: python -m gpt2np serve ..., python -m gpt2np.server ...
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

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
from .httpd import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT, Limits, ModelServer
from .routes import DEFAULT_MAX_PROMPTS, DEFAULT_TIMEOUT, route_list
from .scheduler import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001


def served_name(text: str) -> str:
    """A --served-model-name: what clients send as `model` (and a path part of GET /v1/models/{id})."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise argparse.ArgumentTypeError(f"must not hold control characters, got {text!r}")
    return text


def public_name(model: str) -> str:
    """The model's name as /health shows it: a hub id as given, a local folder by its last component
    only (its path says how the host's disk is laid out, which is no client's business)."""
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model


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
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        action="extend",
        type=served_name,
        metavar="NAME",
        help="the name(s) /v1/models lists and the model field of /v1/completions accepts; repeatable, the "
        "first is the one /health shows (default: --model, a local folder by its last component)",
    )
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


def serve_until_signalled(server: ModelServer) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully; a second signal stops at once."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        names = ", ".join(server.app.model_names)
        server.log(f"serving {names} on {server.url} ({route_list()})")
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
        server = ModelServer(
            (args.host, args.port),
            model,
            model_name=args.served_model_name or [public_name(args.model)],
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
