"""The GPT-2 model card's request format, read and checked in one place for the command line
(`gpt2np generate --json FILE`) and the server (`POST /score`):

    {"input_data": ["My name is John and I am"], "params": {"max_new_tokens": 100, "do_sample": true}}

or Azure ML's shape of the same request, the params inside input_data:

    {"input_data": {"input_string": ["My name is John and I am"], "parameters": {"max_new_tokens": 100}}}

`params` are keyword arguments of `GPT2.generate` (PARAMS lists them). Their JSON types are checked
here, in JSON's words (`true` is not a number); their ranges are GenerationOptions' own rules, so the
library, the command line and the server accept exactly the same values. A request that breaks a rule
is a RequestError whose message names the field as the request spells it ("params.top_p",
"input_data.input_string[1]"); the server answers it with a 400, the command line with its one-line
error. Both give the same message for the same request.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .sampling import GenerationOptions, OptionError, generation_arguments

# The sample request of GPT-2's model card for its inference endpoint.
MODEL_CARD_REQUEST = {
    "input_data": ["I believe the meaning of life is"],
    "params": {"top_p": 1.0, "temperature": 0.8, "max_new_tokens": 100, "do_sample": True, "return_full_text": True},
}
EXAMPLE = json.dumps({"input_data": ["a prompt"], "params": {"max_new_tokens": 100}})


class RequestError(ValueError):
    """A request that breaks the format; the message names the field and what it must be."""


@dataclass(frozen=True)
class Request:
    """A checked request: the prompts and the arguments of `GPT2.generate` they are to be run with,
    plus where the request put them, to name them in later messages (a prompt too long)."""

    prompts: list[str]
    options: GenerationOptions
    seed: int | None
    return_full_text: bool
    prompts_field: str = "input_data"  # "input_data.input_string" in Azure ML's shape
    params_field: str = "params"  # "input_data.parameters" in Azure ML's shape
    given_params: frozenset[str] = frozenset()  # the names of the params the request set

    def prompt_field(self, i: int) -> str:
        return f"{self.prompts_field}[{i}]"

    def param_field(self, name: str) -> str:
        return f"{self.params_field}.{name}"

    def arguments(self) -> dict:
        """The keyword arguments of GPT2.generate this request asks for."""
        return {**asdict(self.options), "seed": self.seed, "return_full_text": self.return_full_text}


# ---------------------------------------------------------------------------------------- params
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_boolean(v) -> bool:
    return isinstance(v, bool)


def _is_optional_integer(v) -> bool:
    return v is None or _is_integer(v)


def _is_stop(v) -> bool:
    strings = [v] if isinstance(v, str) else v if isinstance(v, list) else None
    return v is None or (strings is not None and all(isinstance(s, str) and s for s in strings))


# The known params, the model card's five first, each with the JSON it must be (ranges are
# GenerationOptions' and the seed rule's, checked after).
PARAMS = {
    "top_p": (_is_number, "a number"),
    "temperature": (_is_number, "a number"),
    "max_new_tokens": (_is_integer, "an integer"),
    "do_sample": (_is_boolean, "true or false"),
    "return_full_text": (_is_boolean, "true or false"),
    "top_k": (_is_optional_integer, "an integer or null"),
    "repetition_penalty": (_is_number, "a number"),
    "stop": (_is_stop, "a non-empty string, a list of them or null"),
    "seed": (_is_optional_integer, "an integer or null"),
    "ignore_eos": (_is_boolean, "true or false"),
    "prompt_lookup_num_tokens": (_is_optional_integer, "an integer or null"),
    "max_matching_ngram_size": (_is_integer, "an integer"),
}


# ---------------------------------------------------------------------------------------- parsing
def parse_request(body: str | bytes, *, defaults: Mapping | None = None) -> Request:
    """A request's JSON text (or its UTF-8 bytes), checked. `defaults` are keyword arguments of
    GPT2.generate that the request's params override (the command line's flags)."""
    return check_request(read_json(body, example=EXAMPLE), defaults=defaults)


def read_json(body: str | bytes, *, example: str):
    """A request body's JSON value (strict: UTF-8, no NaN or Infinity), or a RequestError that shows
    `example`, a request that would be read. Shared by every JSON route, so each reads bodies alike."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"{e.reason} at byte {e.start}"
            raise RequestError(f"the request is not UTF-8 ({problem}); JSON must be encoded in UTF-8") from None
    if not body.strip():
        raise RequestError(f"the request is empty; send a JSON object such as {example}")
    try:
        return json.loads(body, parse_constant=_reject_constant, parse_int=_read_int)
    except RecursionError:
        raise RequestError("the request is nested too deeply to read; a request looks like " + example) from None
    except _IntegerTooLong as e:
        raise RequestError(
            f"the request holds an integer of {e.digits} digits, more than the {e.limit} this reader takes "
            "(no field needs one so long); send a shorter number"
        ) from None
    except ValueError as e:
        raise RequestError(f"the request is not valid JSON ({e}); a request looks like {example}") from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class _IntegerTooLong(ValueError):
    def __init__(self, digits: int, limit: int):
        super().__init__(f"an integer of {digits} digits")
        self.digits, self.limit = digits, limit


def _read_int(text: str) -> int:
    """A JSON integer, refused with its own message past Python's limit on converting digits
    (4,300 by default), where int() raises a ValueError that tells a server's operator, not the
    client, what to change."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    digits = len(text.lstrip("-"))
    if limit and digits > limit:
        raise _IntegerTooLong(digits, limit)
    return int(text)


def check_request(data, *, defaults: Mapping | None = None) -> Request:
    """A parsed request (any JSON value), checked: the flat shape or Azure ML's."""
    if not isinstance(data, dict):
        raise RequestError(f"the request must be a JSON object like {EXAMPLE}, got {_json(data)}")
    _reject_unknown_keys(data, ("input_data", "params"), where="the request")
    if isinstance(data.get("input_data"), dict):  # Azure ML's shape: the params travel inside input_data
        if "params" in data:
            raise RequestError('put the params in "params" or in "input_data"."parameters", not both')
        inner = data["input_data"]
        _reject_unknown_keys(inner, ("input_string", "parameters"), where="input_data")
        fields = ("input_data.input_string", "input_data.parameters")
        prompts = check_prompts(inner.get("input_string"), field=fields[0], holder="input_data")
        params = inner.get("parameters", {})
    else:
        fields = ("input_data", "params")
        prompts = check_prompts(data.get("input_data"), field=fields[0], holder="the request")
        params = data.get("params", {})
    options, seed, return_full_text = check_params(params, field=fields[1], defaults=defaults)
    return Request(prompts, options, seed, return_full_text, *fields, frozenset(params))


def check_prompts(prompts, *, field: str, holder: str) -> list[str]:
    """The prompts: a non-empty list of strings at `field` (inside `holder`, to say where one is missing)."""
    key = field.rsplit(".", 1)[-1]
    if prompts is None:
        raise RequestError(f'{holder} has no "{key}": give the prompts as "{key}": ["a prompt", ...]')
    rule = f"{field} must be a non-empty list of prompt strings"
    if isinstance(prompts, str):
        raise RequestError(f'{rule}, got a string: wrap a single prompt as ["..."]')
    if not isinstance(prompts, list) or not prompts:
        raise RequestError(f'{rule}, like ["a prompt"], got {_json(prompts)}')
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise RequestError(f"{field}[{i}] must be a string, got {_json(prompt)}")
        _reject_lone_surrogate(prompt, f"{field}[{i}]")
    return list(prompts)


def _reject_lone_surrogate(text: str, field: str) -> None:
    """JSON's \\u escapes can spell half of a UTF-16 pair alone ("\\udcff"), which is no character:
    such a prompt could be generated from but its answer could not be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        raise RequestError(
            f"{field} holds a lone surrogate \\u{code:04x} at character {e.start}, which is not a "
            "character; send valid Unicode"
        ) from None


def check_params(params, *, field: str = "params", defaults: Mapping | None = None):
    """The params at `field`, checked: (GenerationOptions, seed, return_full_text)."""
    if not isinstance(params, dict):
        example = json.dumps(MODEL_CARD_REQUEST["params"])
        raise RequestError(f"{field} must be a JSON object like {example}, got {_json(params)}")
    for name, value in params.items():
        if name not in PARAMS:
            raise RequestError(f"unknown param {_json(name)} in {field}; the known params are {', '.join(PARAMS)}")
        is_valid, expected = PARAMS[name]
        if not is_valid(value):
            raise RequestError(f"{field}.{name} must be {expected}, got {_json(value)}")
    try:
        return generation_arguments({**(defaults or {}), **params}, method="generate")
    except OptionError as e:  # a range: named as the request spells it, if the request set it
        raise RequestError(f"{field}.{e.field} {e.rule}" if e.field in params else str(e)) from None


def _reject_unknown_keys(obj: dict, known: tuple[str, ...], *, where: str) -> None:
    unknown = [k for k in obj if k not in known]
    if unknown:
        allowed = " and ".join(json.dumps(k) for k in known)
        raise RequestError(f"unknown key {_json(unknown[0])} in {where}; it holds {allowed}")


def _json(value, limit: int = 60) -> str:
    """A parsed value as the request wrote it (`true`, `null`, `"50"`), cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_prompt_bytes(prompt: str, field: str, *, n_ctx: int, max_token_bytes: int) -> None:
    """Refuse a prompt too long for the context before tokenizing it (a 300 KB word takes seconds):
    one token stands for at most `max_token_bytes` UTF-8 bytes, so a prompt of b bytes is at least
    b / max_token_bytes tokens. The finer rule, with max_new_tokens, needs the tokens: engine.check_fits."""
    size = len(prompt.encode("utf-8", errors="surrogatepass"))
    if size > (n_ctx - 1) * max_token_bytes:  # more than n_ctx - 1 tokens: no room to generate
        raise RequestError(
            f"{field} is {size} bytes, at least {-(-size // max_token_bytes)} tokens, more than the "
            f"model's {n_ctx}-token context holds; shorten it to at most {n_ctx - 1} tokens"
        )


def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token stands for (128 in GPT-2's vocabulary)."""
    return max(len(tokenizer.decode_single_token_bytes(i)) for i in range(tokenizer.n_vocab))
