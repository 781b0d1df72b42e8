"""The gpt2np command line: `gpt2np generate`, `download`, `serve`, `eval` and `batch`.

    gpt2np "I believe the meaning of life is"       # no command means generate
    gpt2np generate --json request.json             # a request in the model card endpoint's format
    gpt2np download gpt2-medium                     # fetch into the hub cache, print the folder

The same commands run as `python -m gpt2np ...`, and `python scripts/generate.py ...` is
`gpt2np generate ...`.

The commands print; the library never does. Every command keeps gpt2np.console's promise: a
problem with the input (a bad flag value, a malformed request, a missing model, a prompt too long
for the context) is one line on stderr naming the fix, with exit status 2. Ctrl-C exits with status
130, leaving what was printed as it was. Output that cannot be written and unexpected errors are one
line with status 1; `--debug` (or GPT2NP_DEBUG=1) adds the traceback. A request (--json) is read by
gpt2np.request, as the server reads it.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import sys
import textwrap

from .console import (
    EXIT_OK,
    ArgumentParser,
    UsageError,
    add_debug_argument,
    add_threads_argument,
    load_model,
    non_negative_float,
    non_negative_int,
    note,
    one_line,
    positive_float,
    positive_int,
    probability,
    require_stdout,
    run,
    stop_text,
    wants_debug,
)

# `gpt2np serve ...`, `gpt2np eval ...` and `gpt2np batch ...` hand their arguments, unchanged, to
# `main(argv) -> int` of these modules, imported only when asked for.
MODULE_COMMANDS = {"serve": "gpt2np.server", "eval": "gpt2np.evaluate", "batch": "gpt2np.batch"}
COMMANDS = ("generate", "download", *MODULE_COMMANDS)

TOP_LEVEL_HELP = """\
usage: {prog} [generate] [PROMPT] [options]
       {prog} download [MODEL] [--revision REV] [--cache-dir DIR] [--quiet]
       {prog} serve ...
       {prog} eval ...
       {prog} batch INPUT --task generate|score [--output FILE] ...

GPT-2 inference in pure NumPy.

commands:
  generate   continue a prompt and print the text; the default command, so
             `{prog} "Hello"` is `{prog} generate "Hello"`
  download   fetch a checkpoint into the hub cache and print its folder
  serve      serve the model card's HTTP endpoint (see `{prog} serve --help`)
  eval       evaluate a checkpoint (see `{prog} eval --help`)
  batch      generate for, or score, every line of a file, resumably, on
             one or N processes or a Ray cluster (see `{prog} batch --help`)

`{prog} generate --help` lists every generation flag with its default.
"""


# ---------------------------------------------------------------------------------------- entry
def main(argv=None, *, prog=None, command=None) -> int:
    """Run the command line (`argv` defaults to sys.argv[1:]) and return the exit status.

    `command` fixes the command instead of reading it from argv (scripts/generate.py passes
    "generate"); `prog` is the program's name in messages (default: the name it was run by).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or os.path.basename(sys.argv[0]) or "gpt2np"

    def body() -> int:
        return dispatch(argv, prog) if command is None else run_command(command, argv, prog=prog)

    return run(body, prog=prog, debug=wants_debug(argv))


def dispatch(argv: list[str], prog: str) -> int:
    """Route to a command; a first argument that is not a command starts `generate`."""
    if argv and argv[0] in ("-h", "--help"):
        print(TOP_LEVEL_HELP.format(prog=prog), end="")
        return EXIT_OK
    if argv and argv[0] == "--version":
        from . import __version__

        print(f"gpt2np {__version__}")
        return EXIT_OK
    if not argv or argv[0] not in COMMANDS:  # named in usage and hints as the command it is
        return generate_command(argv, prog=f"{prog} generate")
    return run_command(argv[0], argv[1:], prog=f"{prog} {argv[0]}")


def run_command(command: str, argv: list[str], *, prog: str) -> int:
    if command == "generate":
        return generate_command(argv, prog=prog)
    if command == "download":
        return download_command(argv, prog=prog)
    if command in MODULE_COMMANDS:
        return module_command(command, argv)
    raise ValueError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)}")


def module_command(command: str, argv: list[str]) -> int:
    """`serve`, `eval` and `batch`: import their module now and pass the arguments through unchanged."""
    name = MODULE_COMMANDS[command]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # the module exists but lacks a dependency: that is its own error
            raise
        raise UsageError(
            f"the '{command}' command is not available: this gpt2np has no {name} module; "
            "update gpt2np, or use 'generate' or 'download'"
        ) from e
    status = module.main(argv)
    return EXIT_OK if status is None else status


# ---------------------------------------------------------------------------------------- generate
def generate_command(argv: list[str], *, prog: str) -> int:
    """`gpt2np generate`: continue one prompt (or a JSON request's prompts) and print the text."""
    args = generate_parser(prog).parse_args(argv)
    check_generate_args(args)
    require_stdout()
    request = read_request(args.json, args) if args.json is not None else flags_request(args)
    model = load_model(
        args.model, revision=args.revision, cache_dir=args.cache_dir, progress=not args.quiet, threads=args.threads
    )
    prompts = fit_prompts(model, request, args, prog=prog)
    if args.json is not None:
        print_json_answer(model, prompts, request, args.num_samples, out=sys.stdout)
    elif should_stream(args, sys.stdout):
        stream_samples(model, prompts[0], request, args.num_samples, out=sys.stdout)
    else:
        print_samples(model, prompts[0], request, args.num_samples, out=sys.stdout)
    return EXIT_OK


def generate_parser(prog: str) -> ArgumentParser:
    from .request import MODEL_CARD_REQUEST, PARAMS

    request = textwrap.indent(json.dumps(MODEL_CARD_REQUEST, indent=2), " " * 6)
    extra_params = [name for name in PARAMS if name not in MODEL_CARD_REQUEST["params"]]
    epilog = f"""\
examples:
  %(prog)s "I believe the meaning of life is"
  echo "Once upon a time" | %(prog)s --max-new-tokens 20 --seed 0
  %(prog)s --json request.json

  where request.json is the model card's request for its endpoint:
{request}
  prints the endpoint's answer: a JSON list of strings, one per prompt. "params" may also hold
  {", ".join(extra_params)}; params override flags.
  Azure ML's shape {{"input_data": {{"input_string": [...], "parameters": {{...}}}}}} is read too.

what is printed:
  The prompt, the generated text, a newline (only the generated text with --no-full-text).
  With --num-samples N > 1, each sample is preceded by a line "=== sample i of N ===".

exit status:
  0 done, 2 bad input (a flag, the request, the model, a prompt too long), 130 interrupted
  (Ctrl-C), 1 internal error or output that cannot be written (a full disk, a closed stdout).
"""
    parser = ArgumentParser(
        prog=prog,
        description="Continue a prompt with GPT-2 and print the text.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "prompt",
        nargs="?",
        metavar="PROMPT",
        help="the text to continue; '-' or no PROMPT reads it from stdin when stdin is not a "
        "terminal (one final newline is dropped); '' asks for text from nothing",
    )
    parser.add_argument(
        "--model",
        default="gpt2",
        metavar="NAME_OR_FOLDER",
        help="a hub repo id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, org/name) or a "
        "checkpoint folder (default: %(default)s)",
    )
    add_hub_arguments(parser)
    add_threads_argument(parser)
    g = parser.add_argument_group("generation")
    add_generation_arguments(g)
    g.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="when the prompt and --max-new-tokens do not fit the model's context, keep the prompt's "
        "last tokens instead of failing (default: fail)",
    )
    o = parser.add_argument_group("output")
    o.add_argument(
        "--no-full-text",
        action="store_true",
        help="print only the new text, not the prompt before it (return_full_text off) (default: prompt and new text)",
    )
    o.add_argument(
        "--num-samples",
        type=positive_int,
        default=1,
        metavar="N",
        help="generate N samples of the prompt (default: %(default)s)",
    )
    o.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print the text as it is generated (default: on when stdout is a terminal)",
    )
    o.add_argument(
        "--json",
        metavar="FILE",
        help="read a request in the model card endpoint's format from FILE ('-' for stdin) and print "
        "the answer as a JSON list of strings (default: none)",
    )
    o.add_argument("--quiet", action="store_true", help="no progress bars or notes on stderr (default: show them)")
    add_debug_argument(o)
    return parser


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


def check_generate_args(args: argparse.Namespace) -> None:
    """Combinations of flags that cannot work together."""
    if args.json is not None and args.prompt is not None:
        raise UsageError("pass either a PROMPT or --json FILE, not both")
    if args.json is not None and args.stream:
        raise UsageError("--stream cannot be used with --json: the answer is printed as one JSON list")
    if args.json is None and args.do_sample and args.temperature == 0:  # a request's do_sample may still say false
        raise UsageError("--temperature must be > 0 when sampling; for deterministic text use --greedy")


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


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of GPT2.generate, as the flags set them."""
    return dict(option_kwargs(args), seed=args.seed, return_full_text=not args.no_full_text)


def flags_request(args: argparse.Namespace):
    """The prompt and the flags as a checked request; the options are checked before stdin is read
    or any model is loaded, so a typo costs no download."""
    from .request import Request
    from .sampling import generation_arguments

    try:
        options, seed, return_full_text = generation_arguments(generation_kwargs(args), method="generate")
    except (TypeError, ValueError) as e:
        raise UsageError(one_line(e)) from e
    return Request([read_prompt(args.prompt)], options, seed, return_full_text)


def should_stream(args: argparse.Namespace, out) -> bool:
    """--stream / --no-stream if given; otherwise stream when writing to a terminal."""
    if args.stream is not None:
        return args.stream
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------- input
def read_prompt(prompt: str | None) -> str:
    """The prompt argument, or stdin when it is '-' or absent (and stdin is not a terminal)."""
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and (sys.stdin is None or sys.stdin.isatty()):
        raise UsageError(
            'no prompt: pass one as an argument (e.g. "Once upon a time"), pipe it on stdin, or pass --json FILE'
        )
    text = read_stdin("the prompt")
    if not text:
        raise UsageError(
            "stdin was empty: pipe a prompt in, or pass one as an argument ('' asks for text from nothing)"
        )
    return text.removesuffix("\n").removesuffix("\r")  # the newline `echo` adds is not part of the prompt


def read_stdin(what: str) -> str:
    """All of stdin, decoded strictly. Python reads stdin with errors="surrogateescape" in the C.UTF-8
    and POSIX locales, which would turn bytes that are not text into lone surrogates, to be tokenized
    and echoed back; a prompt must be text."""
    if sys.stdin is None:
        raise UsageError(f"cannot read {what} from stdin: there is no stdin")
    if isinstance(sys.stdin, io.TextIOWrapper) and sys.stdin.errors != "strict":
        sys.stdin.reconfigure(errors="strict")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{what} on stdin is not text in the {e.encoding} encoding ({e.reason}); "
            "pass UTF-8 text, or set PYTHONIOENCODING"
        ) from e


def read_request(path: str, args: argparse.Namespace):
    """Read and check a request (gpt2np.request) from a file, or from stdin when `path` is '-'; its
    params override the flags. A bad request is a UsageError naming where it came from."""
    from .request import RequestError, parse_request

    source = "the request on stdin" if path == "-" else path
    text = read_stdin("the JSON request") if path == "-" else read_request_file(path)
    try:
        return parse_request(text, defaults=generation_kwargs(args))
    except RequestError as e:
        raise UsageError(f"{source}: {e}") from e


def read_request_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(
            f"--json {path}: no such file; pass the path of a request file, or - to read it from stdin"
        ) from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--json {path}: not UTF-8 text ({e.reason}); save the request as UTF-8 JSON") from e
    except OSError as e:
        raise UsageError(f"--json {path}: cannot read it ({e.strerror}); pass the path of a request file") from e


# ---------------------------------------------------------------------------------------- model
def fit_prompts(model, request, args: argparse.Namespace, *, prog: str) -> list[str]:
    """The prompts, each checked to fit the context with max_new_tokens, or cut to fit (--truncate-prompt)."""
    max_new_tokens = request.options.max_new_tokens
    from_request = args.json is not None and "max_new_tokens" in request.given_params
    limit = request.param_field("max_new_tokens") if from_request else "--max-new-tokens"  # as the user set it
    fitted = []
    for i, prompt in enumerate(request.prompts):
        name = request.prompt_field(i) if args.json is not None else "the prompt"
        text = fit_prompt(model, prompt, max_new_tokens, truncate=args.truncate_prompt, name=name, limit=limit)
        if text is not prompt and not args.quiet:
            n_ctx, kept = model.config.n_ctx, len(model.tokenizer.encode(text, allowed_special="all"))
            note(
                prog,
                f"{name} is too long: kept its last {kept} tokens, so that {limit} {max_new_tokens} "
                f"fits the {n_ctx}-token context",
            )
        fitted.append(text)
    return fitted


def fit_prompt(model, prompt: str, max_new_tokens: int, *, truncate: bool, name: str, limit: str) -> str:
    """The prompt itself if it fits the context with max_new_tokens (the one rule: engine.check_fits);
    else, with `truncate`, the text of its last tokens that do; else a UsageError naming the ways out."""
    from .engine import check_fits
    from .generation import prepare_prompts

    n_ctx = model.config.n_ctx
    budget = n_ctx - max_new_tokens  # the prompt tokens that fit
    if truncate and budget < 1:
        raise UsageError(
            f"{limit} {max_new_tokens} leaves no room for a prompt in the model's {n_ctx}-token "
            f"context, however short; use at most {n_ctx - 1}"
        )
    (ids,) = prepare_prompts(model.tokenizer, [prompt], bos=model.config.bos_token_id)  # as generate encodes it
    try:
        check_fits(len(ids), max_new_tokens, n_ctx, what=name, limit=limit)
        return prompt
    except ValueError as e:
        if not truncate:
            tokens = f"{budget} token{'s' if budget != 1 else ''}"
            hint = f"; or pass --truncate-prompt to keep its last {tokens}" if budget >= 1 else ""
            raise UsageError(f"{e}{hint}") from e
    return last_tokens_text(model.tokenizer, ids, budget)


def last_tokens_text(tokenizer, ids: list[int], budget: int) -> str:
    """The text of the prompt's last tokens, at most `budget` tokens once encoded again.

    A cut can fall inside a UTF-8 character (its leading bytes are dropped) or inside a word whose
    tail encodes differently on its own, so take one token fewer until the text fits.
    """
    continuation_bytes = bytes(range(0x80, 0xC0))
    for k in range(budget, 0, -1):
        text = tokenizer.decode_bytes(ids[-k:]).lstrip(continuation_bytes).decode("utf-8", errors="replace")
        if len(tokenizer.encode(text, allowed_special="all")) <= budget:
            return text
    return ""


# ---------------------------------------------------------------------------------------- printing
def sample_header(i: int, n: int) -> str:
    return f"=== sample {i + 1} of {n} ===\n" if n > 1 else ""


def print_samples(model, prompt: str, request, n: int, *, out) -> None:
    """Generate n samples in one batch, then print them. Sample i draws from the seed's i-th child."""
    texts = model.generate([prompt] * n, **request.arguments())
    for i, text in enumerate(texts):
        out.write(sample_header(i, n) + text + "\n")
    out.flush()


def stream_samples(model, prompt: str, request, n: int, *, out) -> None:
    """Print n samples one after the other, each piece as soon as it is decided. Sample i draws
    from the seed's i-th child, as in print_samples, so both print the same text."""
    from .generation import stream_text
    from .sampling import row_generators

    for i, rng in enumerate(row_generators(request.seed, n)):
        out.write(sample_header(i, n))
        for piece in stream_text(model, prompt, request.options, rng, return_full_text=request.return_full_text):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()


def print_json_answer(model, prompts: list[str], request, n: int, *, out) -> None:
    """The endpoint's answer: a JSON list with one string per prompt (n per prompt, in order, when n > 1)."""
    texts = model.generate([p for p in prompts for _ in range(n)], **request.arguments())
    out.write(json.dumps(texts, indent=2) + "\n")
    out.flush()


# ---------------------------------------------------------------------------------------- download
def download_command(argv: list[str], *, prog: str) -> int:
    """`gpt2np download`: fetch a checkpoint into the hub cache and print its snapshot folder."""
    parser = ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description="Download a GPT-2 checkpoint into the HuggingFace hub cache and print "
        "its folder (files already there are not fetched again). A token for "
        "private or gated repos is read from $HF_TOKEN.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default="gpt2",
        metavar="MODEL",
        help="a hub repo id: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 or org/name (default: %(default)s)",
    )
    add_hub_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    from .hub import snapshot_download

    try:
        folder = snapshot_download(
            args.model, revision=args.revision, cache_dir=args.cache_dir, progress=not args.quiet
        )
    except (ValueError, OSError) as e:  # the hub's errors are OSErrors
        raise UsageError(f"cannot download {args.model!r}: {one_line(e)}") from e
    print(folder)
    return EXIT_OK
