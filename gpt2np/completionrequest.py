"""OpenAI's completions request (the legacy `POST /v1/completions`): its schema and its checks.

    {"model": "gpt2", "prompt": "Once upon a time", "max_tokens": 16, "logprobs": 2}

The fields are OpenAI's, with OpenAI's defaults (max_tokens 16, temperature 1, top_p 1, n 1). Their
ranges are gpt2np's own rules where it has one (GenerationOptions: top_p, stop; the context rule,
engine.check_fits; the log-probs rule, 0 to 5), and OpenAI's where it has none (temperature in
[0, 2], 0 being greedy; n; at most 4 stop strings; the penalties and logit_bias, LogitAdjustments).
`best_of` (other than 1) and `suffix` are refused: GPT-2 cannot insert text, and ranking several
samples by their mean log-prob is left to the client, which can ask for `n` and `logprobs`.
`model` must be one of the names the model is served under (`--served-model-name`).

A request that breaks a rule is a `CompletionError` (an HTTPError with OpenAI's `param` and
`code`): 400 naming the field, 404 for a model not served. What the request becomes (rows, a job,
answers) is gpt2np.completions'.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from .engine import check_fits
from .generation import prepare_prompts
from .httperrors import HTTPError
from .request import RequestError, check_prompt_bytes, read_json
from .sampling import GenerationOptions, LogitAdjustments, OptionError, check_logprobs, check_seed

EXAMPLE = json.dumps({"model": "gpt2", "prompt": "Once upon a time", "max_tokens": 16})
DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_STOP = 4  # stop strings, OpenAI's limit
MAX_N = 128  # choices per prompt, OpenAI's limit
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
FIELDS = (
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "best_of",
    "suffix",
    # gpt2np's extensions: prompt-lookup decoding (GenerationOptions; the same text, fewer passes)
    "prompt_lookup_num_tokens",
    "max_matching_ngram_size",
)
NO_CHAT = (
    "GPT-2 has no chat template: it was trained on web text, not on conversations, so no messages format "
    "is its own; send the conversation as text to POST /v1/completions"
)


class CompletionError(HTTPError):
    """A request the API refuses: its HTTP status and OpenAI's error fields (`param` names the field)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(status, message, param=param, code=code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, whose status the `openai` package maps to its exception classes."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bad(param: str, rule: str) -> CompletionError:
    return CompletionError(400, f"{param} {rule}", param=param.split("[")[0])


def _shown(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class CompletionRequest:
    """A checked request: the served name it asked for (its answers carry it), each prompt's ids, and
    how to continue them."""

    model: str
    prompts: list[list[int]]
    max_tokens: int
    options: GenerationOptions | None  # None when max_tokens is 0 (echo only)
    adjust: LogitAdjustments
    n: int
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


def _is_integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _field(data: dict, name: str, check, expected: str, default=None):
    """data[name] of the JSON type `check` accepts; null or missing is `default`, as in OpenAI's API."""
    value = data.get(name)
    if value is None:
        return default
    if not check(value):
        raise _bad(name, f"must be {expected}, got {_shown(value)}")
    return value


def parse_completion(
    body: bytes,
    model,
    *,
    served: Sequence[str],
    max_tokens_cap: int | None = None,
    max_prompts: int | None = None,
    max_token_bytes: int | None = None,
) -> CompletionRequest:
    """A request body, checked against OpenAI's schema and this model: a CompletionRequest, or a
    CompletionError naming the field (400), or the model (404)."""
    try:
        data = read_json(body, example=EXAMPLE)
    except RequestError as e:
        raise CompletionError(400, str(e)) from None
    if not isinstance(data, dict):
        raise CompletionError(400, f"the request must be a JSON object like {EXAMPLE}, got {_shown(data)}")
    _check_keys(data, served)
    max_tokens = _max_tokens(data, max_tokens_cap)
    n = _field(data, "n", _is_integer, "an integer", 1)
    if not 1 <= n <= MAX_N:
        raise _bad("n", f"must be in [1, {MAX_N}], got {n}")
    stream = _field(data, "stream", lambda v: isinstance(v, bool), "true or false", False)
    logprobs = _field(data, "logprobs", _is_integer, "an integer or null")
    try:
        logprobs, seed = check_logprobs(logprobs), check_seed(_field(data, "seed", _is_integer, "an integer or null"))
        options, adjust = _options(data, max_tokens), _adjustments(data, model.config.vocab_size)
    except OptionError as e:
        raise _bad("max_tokens" if e.field == "max_new_tokens" else e.field, e.rule) from None
    _check_size(data.get("prompt"), n, model.config.n_ctx, max_prompts, max_token_bytes)
    prompts = _prompts(data.get("prompt"), model)  # tokenized last: a request refused for its fields costs little
    request = CompletionRequest(
        data["model"],
        prompts,
        max_tokens,
        options,
        adjust,
        n,
        seed,
        stream,
        _include_usage(data, stream),
        logprobs,
        _field(data, "echo", lambda v: isinstance(v, bool), "true or false", False),
    )
    _check_lengths(request, model)
    return request


def unknown_model(name, served: Sequence[str]) -> CompletionError:
    """The 404 for a model this server does not serve (OpenAI's code, `model_not_found`)."""
    names = ", ".join(_shown(n) for n in served)
    message = f"the model {_shown(name)} does not exist here; this server serves {names}"
    return CompletionError(404, message, param="model", code="model_not_found")


def _check_keys(data: dict, served: Sequence[str]) -> None:
    """Unknown fields, the model, and the fields this server does not implement."""
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise CompletionError(
            400, f"unknown field {_shown(unknown[0])}; the fields are {', '.join(FIELDS)}", param=str(unknown[0])
        )
    model = data.get("model")
    if not isinstance(model, str):
        names = " or ".join(_shown(n) for n in served)
        raise _bad("model", f"must be the served model's name, {names} (GET /v1/models), got {_shown(model)}")
    if model not in served:
        raise unknown_model(model, served)
    if _field(data, "best_of", _is_integer, "an integer or null") not in (None, 1):
        raise _bad("best_of", "is not supported: ask for n choices with logprobs and rank them yourself")
    if data.get("suffix") not in (None, ""):
        raise _bad("suffix", "is not supported: GPT-2 continues text and cannot insert it before a suffix")
    _field(data, "user", lambda v: isinstance(v, str), "a string")


def _check_size(value, n: int, n_ctx: int, max_prompts: int | None, max_token_bytes: int | None) -> None:
    """The server's limits that need no tokens (request.check_prompt_bytes): rows (prompts times n)
    within --max-prompts, and no prompt string with more bytes than the context can hold."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    many = isinstance(value, list) and value and not all(_is_integer(t) for t in value)
    rows = (len(value) if many else 1) * n
    if max_prompts is not None and rows > max_prompts:
        raise CompletionError(
            400,
            f"prompt and n ask for {rows} completions; this server makes at most {max_prompts} "
            "per request (its --max-prompts): split them over several requests",
            param="prompt",
        )
    for i, text in enumerate(texts):
        if isinstance(text, str) and max_token_bytes is not None:
            field = "prompt" if isinstance(value, str) else f"prompt[{i}]"
            try:
                check_prompt_bytes(text, field, n_ctx=n_ctx, max_token_bytes=max_token_bytes)
            except RequestError as e:
                raise CompletionError(400, str(e), param="prompt") from None


def _prompts(value, model) -> list[list[int]]:
    """`prompt` as OpenAI takes it: a string, a list of strings, a list of token ids or a list of
    id lists. Missing, it is <|endoftext|>, the start of a document."""
    bos, tokenizer = model.config.bos_token_id, model.tokenizer
    if value is None:
        return [[bos]]
    if isinstance(value, str):
        return prepare_prompts(tokenizer, [_unicode(value, "prompt")], bos=bos)
    rule = "must be a string, a list of strings, a list of token ids or a list of token-id lists"
    if not isinstance(value, list) or not value:
        raise _bad("prompt", f"{rule}, got {_shown(value)}")
    if all(isinstance(p, str) for p in value):
        return prepare_prompts(tokenizer, [_unicode(p, f"prompt[{i}]") for i, p in enumerate(value)], bos=bos)
    if all(_is_integer(t) for t in value):
        return [_ids(value, "prompt", model)]
    if all(isinstance(p, list) for p in value):
        return [_ids(p, f"prompt[{i}]", model) for i, p in enumerate(value)]
    raise _bad("prompt", f"{rule} (not a mix), got {_shown(value)}")


def _unicode(text: str, field: str) -> str:
    """A prompt string that UTF-8 can encode (JSON can spell a lone surrogate, "\\udcff")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(field, f"is not valid Unicode ({e.reason} at character {e.start})") from None
    return text


def _ids(ids, field: str, model) -> list[int]:
    n_vocab = min(model.config.vocab_size, model.tokenizer.n_vocab)
    if not ids or not all(_is_integer(t) and 0 <= t < n_vocab for t in ids):
        raise _bad(field, f"must be a non-empty list of token ids in [0, {n_vocab}), got {_shown(ids)}")
    return list(ids)


def _max_tokens(data: dict, cap: int | None) -> int:
    max_tokens = _field(data, "max_tokens", _is_integer, "an integer or null", DEFAULT_MAX_TOKENS)
    if max_tokens < 0 or (max_tokens == 0 and data.get("echo") is not True):
        raise _bad("max_tokens", f"must be >= 1 (0 only with echo, to score the prompt), got {max_tokens}")
    if cap is not None and max_tokens > cap:
        raise _bad("max_tokens", f"must be at most {cap} here (this server's --max-new-tokens-cap), got {max_tokens}")
    return max_tokens


def _options(data: dict, max_tokens: int) -> GenerationOptions | None:
    """GenerationOptions for OpenAI's fields: temperature 0 is greedy; EOS ends a choice."""
    temperature = _field(data, "temperature", _is_number, "a number", 1.0)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise _bad("temperature", f"must be in [0, {MAX_TEMPERATURE:g}] (0 is greedy), got {temperature}")
    top_p = _field(data, "top_p", _is_number, "a number", 1.0)
    stop = _field(data, "stop", lambda v: isinstance(v, (str, list)), "a string or a list of strings", ())
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them, got {_shown(stop)}")
    lookup = _field(data, "prompt_lookup_num_tokens", lambda v: v is None or _is_integer(v), "an integer or null")
    ngram = _field(data, "max_matching_ngram_size", _is_integer, "an integer", 2)
    if max_tokens == 0:
        return None
    return GenerationOptions(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_p=top_p,
        stop=tuple(stop),
        prompt_lookup_num_tokens=lookup,
        max_matching_ngram_size=ngram,
    )


def _adjustments(data: dict, vocab_size: int) -> LogitAdjustments:
    bias = _field(data, "logit_bias", lambda v: isinstance(v, dict), "an object of token ids to numbers", {})
    pairs, keys = [], {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or not _is_number(value):
            raise _bad("logit_bias", f"must map token ids (as strings) to numbers, got {_shown({key: value})}")
        # The range is checked on the digits before int() reads them: Python refuses to convert a
        # string of more than 4,300 digits (a ValueError), and no token id has more than a few.
        digits = key.lstrip("0") or "0"  # leading zeros count towards Python's limit too
        if len(digits) > len(str(vocab_size)) or int(digits) >= vocab_size:
            shown = key if len(key) <= 20 else f"a key of {len(key)} digits"
            raise _bad("logit_bias", f"token ids must be in [0, {vocab_size}), got {shown}")
        token = int(digits)
        if token in keys:  # "7" and "07" name one token: its bias would be added twice
            raise _bad(
                "logit_bias", f"names token {token} twice ({_shown(keys[token])} and {_shown(key)}): give it once"
            )
        keys[token] = key
        pairs.append((token, value))
    penalties = [_field(data, name, _is_number, "a number", 0.0) for name in ("presence_penalty", "frequency_penalty")]
    return LogitAdjustments(*penalties, tuple(pairs))


def _include_usage(data: dict, stream: bool) -> bool:
    options = _field(data, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    if options and not stream:
        raise _bad("stream_options", "is only allowed with stream: true")
    if any(k != "include_usage" for k in options) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options", f'must be {{"include_usage": true or false}}, got {_shown(options)}')
    return options.get("include_usage", False)


def _check_lengths(request: CompletionRequest, model) -> None:
    """Each prompt with max_tokens must fit the context (engine.check_fits; echo alone needs the prompt to fit)."""
    n_ctx = model.config.n_ctx
    for i, ids in enumerate(request.prompts):
        what = "prompt" if len(request.prompts) == 1 else f"prompt[{i}]"
        try:
            if request.max_tokens == 0 and len(ids) > n_ctx:
                raise ValueError(f"{what} is {len(ids)} tokens, more than the model's {n_ctx}-token context")
            if request.max_tokens:
                check_fits(len(ids), request.max_tokens, n_ctx, what=what, limit="max_tokens")
        except ValueError as e:
            raise CompletionError(400, str(e), param="prompt", code="context_length_exceeded") from None
