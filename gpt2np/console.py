"""What every gpt2np command shares: its parser, its flag types, its exit statuses and how it fails.

`gpt2np generate` and `download` (gpt2np.cli), `gpt2np serve` (gpt2np.server) and `gpt2np eval`
(gpt2np.evaluate) all keep one promise: a problem with the input is one line on stderr naming the
fix, with exit status 2; Ctrl-C is status 130; output that cannot be written (a full disk, a closed
stdout) is one line and status 1, and a reader that left (`| head`) ends it quietly with status 1;
anything unexpected is one line and status 1, with the traceback under --debug or GPT2NP_DEBUG=1.
`run` keeps it for a command's body.

The flags more than one command takes live here too (`add_generation_arguments`, `add_hub_arguments`,
`option_kwargs`): `gpt2np generate` and `gpt2np batch` both build on them.

This module imports none of the commands (they all import it), and nothing heavy: a command that
fails on a bad flag fails before NumPy is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1  # an internal error, or stdout could not be written
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + 2  # killed by SIGINT, as shells report it


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


class OutputError(Exception):
    """stdout cannot take the output (closed, a full disk): printed as one line, exit status 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a one-line UsageError instead of usage text and exit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        check_ctrl_c()  # the command's modules are imported by now: a Ctrl-C they swallowed is raised here
        return super().parse_args(args, namespace)


# ---------------------------------------------------------------------------------------- running
def run(body: Callable[[], int | None], *, prog: str, debug: bool = False, usage_errors: tuple = ()) -> int:
    """Run a command's body and return its exit status, turning every way it can fail into the
    statuses and one-line messages of the module's docstring. `usage_errors` are more exception
    types to report as bad input (status 2), for a command whose library raises them for bad data."""
    with counting_ctrl_c() as ctrl_c:
        try:
            tolerate_unencodable_output()
            with guarded_stdout():
                status = body()
                sys.stdout.flush()  # a full disk shows here, not in Python's last flush at exit
            if status == EXIT_INTERRUPTED:  # a command run by another (gpt2np batch) has said so already
                return status
            check_ctrl_c()
            return EXIT_OK if status is None else status
        except KeyboardInterrupt:
            ctrl_c.seen = ctrl_c.presses
            return interrupted(prog)
        except BrokenPipeError:  # `gpt2np ... | head`: the reader left; nothing more to say
            silence_stdout()
            return EXIT_FAILURE
        except OutputError as e:
            silence_stdout()
            return fail(prog, f"cannot write the output: {one_line(e)}", EXIT_FAILURE)
        except SystemExit as e:  # argparse's --help and --version
            return e.code if isinstance(e.code, int) else EXIT_OK
        except Exception as e:
            if ctrl_c.presses > ctrl_c.seen:  # raised in place of the KeyboardInterrupt (see counting_ctrl_c)
                ctrl_c.seen = ctrl_c.presses
                return interrupted(prog)
            return failed(prog, e, debug=debug, usage=isinstance(e, (UsageError, *usage_errors)))


def failed(prog: str, error: Exception, *, debug: bool, usage: bool) -> int:
    """Say what went wrong in one line: bad input (status 2), or an internal error (status 1)."""
    if debug:
        traceback.print_exc()
    if usage:
        return fail(prog, one_line(error), EXIT_USAGE)
    hint = "" if debug else "run again with --debug to see the traceback, and "
    message = f"internal error ({type(error).__name__}: {one_line(error)}); {hint}please report it"
    return fail(prog, message, EXIT_FAILURE)


# ---------------------------------------------------------------------------------------- Ctrl-C
class _CtrlC:
    """A SIGINT handler that raises KeyboardInterrupt, as Python's own does, and counts the presses
    (and those a command has said it was interrupted by: a command run by another shares the count).

    It does not raise inside code that exec() runs (dataclasses and namedtuple build their methods
    so, while modules are imported): a KeyboardInterrupt leaving exec() makes CPython end the process
    by SIGINT at exit, however it was handled. That press is raised by `check_ctrl_c` instead."""

    def __init__(self):
        self.presses = self.seen = 0

    def __call__(self, signum, frame):
        self.presses += 1
        while frame is not None:
            code = frame.f_code
            if code.co_filename == "<string>" and code.co_name == "<module>":  # the code exec() runs
                return
            frame = frame.f_back
        raise KeyboardInterrupt


@contextlib.contextmanager
def counting_ctrl_c():
    """Count Ctrl-C presses while a command runs, because the KeyboardInterrupt can be lost on its way
    up. While NumPy is imported, Python raises it inside C code that swallows it (and may raise another
    error instead: a "broken installation"), or inside a callback, where Python prints "Exception
    ignored ..." with a traceback and goes on; `_CtrlC` holds it back inside exec(). So an error after
    a press is reported as the interruption it is, `check_ctrl_c` raises a press that was lost or held
    back, and such a callback's message is not printed. Python's handler is replaced only where it is
    in place (not where SIGINT is ignored), and a command run by another shares the count."""
    current = signal.getsignal(signal.SIGINT)
    if isinstance(current, _CtrlC):  # a command run by another (gpt2np serve, from gpt2np's main)
        yield current
        return
    if current is not signal.default_int_handler or threading.current_thread() is not threading.main_thread():
        yield _CtrlC()  # never called: presses stay 0
        return
    handler, unraisable = _CtrlC(), sys.unraisablehook
    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = lambda failure: None if failure.exc_type is KeyboardInterrupt else unraisable(failure)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGINT, current)
        sys.unraisablehook = unraisable


def check_ctrl_c() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C pressed during this command that was lost on its way up
    (see counting_ctrl_c): a press no command has reported. Called after the arguments are parsed
    (the heavy imports are done), after the model is loaded, and at the end."""
    handler = signal.getsignal(signal.SIGINT)
    if isinstance(handler, _CtrlC) and handler.presses > handler.seen:
        raise KeyboardInterrupt


def wants_debug(argv: list[str]) -> bool:
    """--debug among the flags (not after `--`), or GPT2NP_DEBUG set to anything but 0."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--debug" in options or os.environ.get("GPT2NP_DEBUG", "") not in ("", "0")


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")


def add_threads_argument(parser, default: str = "$GPT2NP_NUM_THREADS, else every core") -> None:
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"threads of a long forward pass, a prompt's or a score's (default: {default}; 1: serial)",
    )


def load_model(name_or_path: str, *, revision: str, cache_dir: str | None, progress: bool, threads=None):
    """GPT2.from_pretrained, with a failure (no such folder or repo, no network, a bad checkpoint, a
    bad $GPT2NP_NUM_THREADS) turned into a UsageError that names the model."""
    from .api import GPT2

    try:
        model = GPT2.from_pretrained(
            name_or_path, revision=revision, cache_dir=cache_dir, progress=progress, threads=threads
        )
    except (ValueError, OSError) as e:  # the hub's errors are OSErrors
        raise load_failure(name_or_path, e) from e
    check_ctrl_c()
    return model


def load_failure(name_or_path: str, error: BaseException) -> UsageError:
    """The one line a command prints when a model cannot be loaded; after a failed download
    (the hub's errors are OSErrors) it names the bundled model as the way to try gpt2np offline."""
    from .locate import OFFLINE_HINT

    hint = f" ({OFFLINE_HINT})" if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) else ""
    return UsageError(f"cannot load the model {name_or_path!r}: {one_line(error)}{hint}")


# ---------------------------------------------------------------------------------------- output
def fail(prog: str, message: str, status: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def note(prog: str, message: str) -> None:
    print(f"{prog}: note: {message}", file=sys.stderr)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (or its type's name if it has none)."""
    return re.sub(r"\s*\n\s*", " ", str(error)).strip() or type(error).__name__


def interrupted(prog: str) -> int:
    """Ctrl-C: keep everything printed so far, end the terminal's line, say so on stderr."""
    try:
        sys.stdout.flush()
        if sys.stdout.isatty():
            sys.stderr.write("\n")
    except (AttributeError, OSError, ValueError):  # no stdout, or one that cannot be written
        pass
    print(f"{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


class _GuardedStdout:
    """sys.stdout while a command runs: its write and flush failures become OutputErrors, so that they
    are told apart from other OSErrors (a file that cannot be read is bad input, not bad output)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if self._stream is None:
            raise OutputError("stdout is closed")
        return self._call(self._stream.write, text)

    def flush(self) -> None:
        if self._stream is not None:
            self._call(self._stream.flush)

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def __getattr__(self, name):  # encoding, fileno, ...: the stream's own
        return getattr(self._stream, name)

    @staticmethod
    def _call(method, *args):
        try:
            return method(*args)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:  # ValueError: a stream closed by someone else
            raise OutputError(e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)) from e


def require_stdout() -> None:
    """Inside `run`: fail now, before any work, when there is no stdout to print on (`>&-`)."""
    sys.stdout.write("")


@contextlib.contextmanager
def guarded_stdout():
    """Put a `_GuardedStdout` in place of sys.stdout for the block; the real one is back afterwards."""
    real = sys.stdout
    sys.stdout = _GuardedStdout(real)
    try:
        yield
    finally:
        sys.stdout = real


def silence_stdout() -> None:
    """After stdout failed, point its descriptor at /dev/null so Python's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # AttributeError: no stdout at all
        pass


def tolerate_unencodable_output() -> None:
    """Generated text can hold any character; a terminal that cannot show one gets '?', not a crash."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="replace")


# ---------------------------------------------------------------------------------------- flag types
def _bounded(kind, ok, rule: str):
    """An argparse type: parse `kind` (int or float) and require ok(value), else say `rule`."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        value = _parse(kind, text, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value if kind is int else text}")
        return value

    return parse


def _parse(kind, text: str, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


positive_int = _bounded(int, lambda v: v >= 1, "at least 1")
non_negative_int = _bounded(int, lambda v: v >= 0, "0 or more")
non_negative_float = _bounded(float, lambda v: v >= 0, "0 or more")
positive_float = _bounded(float, lambda v: v > 0, "more than 0")
port_number = _bounded(int, lambda v: 0 <= v <= 65535, "in 0..65535 (0 picks a free port)")


def probability(text: str) -> float:
    value = _parse(float, text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 turns it off), got {text}")
    return value


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def stop_text(text: str) -> str:
    """A stop-string flag's value, with \\n, \\t, \\r and \\\\ turned into the characters (a shell passes
    them literally)."""
    value = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), text)
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


# ---------------------------------------------------------------------------------------- shared flags
def add_generation_arguments(g) -> None:
    """The flags of GenerationOptions' fields, and --seed. Their defaults are GenerationOptions' own."""
    from .sampling import GenerationOptions

    d = GenerationOptions()
    g.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=d.max_new_tokens,
        metavar="N",
        help="generate at most N tokens (default: %(default)s)",
    )
    g.add_argument(
        "--temperature",
        type=non_negative_float,
        default=d.temperature,
        metavar="T",
        help="sampling temperature, > 0; lower is more predictable (default: %(default)s)",
    )
    g.add_argument(
        "--top-p",
        type=probability,
        default=d.top_p,
        metavar="P",
        help="nucleus sampling: draw from the most likely tokens that together reach probability P, "
        "in (0, 1]; 1 turns it off (default: %(default)s)",
    )
    g.add_argument(
        "--top-k",
        type=positive_int,
        default=d.top_k,
        metavar="K",
        help=f"draw only from the K most likely tokens (default: {d.top_k or 'off'})",
    )
    g.add_argument(
        "--repetition-penalty",
        type=positive_float,
        default=d.repetition_penalty,
        metavar="R",
        help="R > 1 makes tokens already in the text less likely; 1 turns it off (default: %(default)s)",
    )
    g.add_argument(
        "--greedy",
        dest="do_sample",
        action="store_false",
        default=d.do_sample,
        help="always take the most likely token (do_sample off: --temperature, --top-k and --top-p "
        f"are not used) (default: {'sample' if d.do_sample else 'greedy'})",
    )
    g.add_argument(
        "--seed",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="random seed: the same seed and options give the same text (default: a new seed each run)",
    )
    g.add_argument(
        "--stop",
        action="append",
        type=stop_text,
        default=None,
        metavar="TEXT",
        help="end the text before the first TEXT; repeatable; \\n, \\t, \\r and \\\\ are understood (default: none)",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        default=d.ignore_eos,
        help="keep generating past the end-of-text token (default: stop there)",
    )
    g.add_argument(
        "--prompt-lookup-num-tokens",
        type=positive_int,
        default=d.prompt_lookup_num_tokens,
        metavar="K",
        help="prompt-lookup decoding: guess up to K next tokens from an earlier occurrence of the last "
        "tokens and check them in one pass: the same text, faster where it repeats (default: off)",
    )
    g.add_argument(
        "--max-matching-ngram-size",
        type=positive_int,
        default=d.max_matching_ngram_size,
        metavar="N",
        help="prompt lookup matches the last N tokens, then fewer (default: %(default)s)",
    )


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--revision", default="main", metavar="REV", help="the hub branch, tag or commit (default: %(default)s)"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="the hub cache (default: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)",
    )


def option_kwargs(args: argparse.Namespace) -> dict:
    """The generation options (GenerationOptions' fields) as `add_generation_arguments`' flags set them."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        max_matching_ngram_size=args.max_matching_ngram_size,
    )
