"""OpenAI's completions API (the legacy `POST /v1/completions`) over gpt2np's engine: the request
schema and its checks, the rows a request becomes, and the answers, whole or as server-sent events.

    {"model": "gpt2", "prompt": "Once upon a time", "max_tokens": 16, "logprobs": 2}

The fields are OpenAI's, with OpenAI's defaults (max_tokens 16, temperature 1, top_p 1, n 1). Their
ranges are gpt2np's own rules where it has one (GenerationOptions: top_p, stop; the context rule,
engine.check_fits; the log-probs rule, 0 to 5), and OpenAI's where it has none (temperature in
[0, 2], 0 being greedy; n; at most 4 stop strings; the penalties and logit_bias, LogitAdjustments).
`best_of` (other than 1) and `suffix` are refused: GPT-2 cannot insert text, and ranking several
samples by their mean log-prob is left to the client, which can ask for `n` and `logprobs`.

Decisions where OpenAI's reference is silent:
- Log-probs are the model's own distribution, before temperature, top-p, penalties and bias (as
  OpenAI and vLLM report them; see gpt2np.engine.Row), so `echo` scoring and sampled tokens agree.
- `top_logprobs` holds the k most likely tokens, plus the chosen one when it is not among them (so up
  to k + 1 entries, as OpenAI documents). A token that is not whole UTF-8 is named `bytes:\\xe2\\x80`.
- The echoed prompt is the text of its ids (for a string prompt, the string itself; an empty prompt
  is conditioned on <|endoftext|> and echoed as it). `text_offset` counts characters from the start
  of the prompt, echoed or not. Its first token has no log-prob (null): nothing comes before it.
- With a stop string, the tokens reported are those whose text starts before the cut.
- Choice `i * n + j` (prompt i, sample j) draws from the seed's child `i * n + j`, so a request gives
  what `GPT2.complete` gives for its prompts each repeated n times with the same seed.
- A request that echoes with log-probs scores its prompts in the request's thread, one request at a
  time (`CompletionsAPI.prompt_parts`); the batch goes on meanwhile.
"""

from __future__ import annotations

import codecs
import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .engine import check_fits
from .generation import RowText, prepare_prompts
from .jobs import Job, JobRow
from .request import RequestError, check_prompt_bytes, read_json
from .sampling import GenerationOptions, LogitAdjustments, OptionError, check_logprobs, check_seed, row_generators

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


class CompletionError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's error fields (`param` names the field)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


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
    """A checked request: each prompt's ids, and how to continue them."""

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
    served: str,
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
        options, adjust = _options(data, max_tokens), _adjustments(data)
    except OptionError as e:
        raise _bad("max_tokens" if e.field == "max_new_tokens" else e.field, e.rule) from None
    _check_size(data.get("prompt"), n, model.config.n_ctx, max_prompts, max_token_bytes)
    prompts = _prompts(data.get("prompt"), model)  # tokenized last: a request refused for its fields costs little
    request = CompletionRequest(
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


def _check_keys(data: dict, served: str) -> None:
    """Unknown fields, the model, and the fields this server does not implement."""
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise CompletionError(
            400, f"unknown field {_shown(unknown[0])}; the fields are {', '.join(FIELDS)}", param=str(unknown[0])
        )
    model = data.get("model")
    if not isinstance(model, str):
        raise _bad("model", f"must be the served model's name, {_shown(served)} (GET /v1/models), got {_shown(model)}")
    if model != served:
        message = f"the model {_shown(model)} does not exist here; this server serves {_shown(served)}"
        raise CompletionError(404, message, param="model", code="model_not_found")
    if data.get("best_of") not in (None, 1):
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


def _adjustments(data: dict) -> LogitAdjustments:
    bias = _field(data, "logit_bias", lambda v: isinstance(v, dict), "an object of token ids to numbers", {})
    pairs = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or not _is_number(value):
            raise _bad("logit_bias", f"must map token ids (as strings) to numbers, got {_shown({key: value})}")
        pairs.append((int(key), value))
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
    n_ctx, vocab = model.config.n_ctx, model.config.vocab_size
    bad = [t for t, _ in request.adjust.logit_bias if t >= vocab]
    if bad:
        raise _bad("logit_bias", f"token ids must be in [0, {vocab}), got {bad[0]}")
    for i, ids in enumerate(request.prompts):
        what = "prompt" if len(request.prompts) == 1 else f"prompt[{i}]"
        try:
            if request.max_tokens == 0 and len(ids) > n_ctx:
                raise ValueError(f"{what} is {len(ids)} tokens, more than the model's {n_ctx}-token context")
            if request.max_tokens:
                check_fits(len(ids), request.max_tokens, n_ctx, what=what, limit="max_tokens")
        except ValueError as e:
            raise CompletionError(400, str(e), param="prompt", code="context_length_exceeded") from None


# ---------------------------------------------------------------------------------------- log-probs
def token_text(tokenizer, token: int) -> str:
    """A token as OpenAI's `tokens` shows it: its text, or `bytes:\\xe2\\x80` when not whole UTF-8."""
    data = tokenizer.decode_single_token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


@dataclass
class Entry:
    """One token of a choice's `logprobs`: its text, log-prob, alternatives and character offset."""

    token: str
    log_prob: float | None
    top: dict[str, float] | None
    offset: int


def _top(tokenizer, ids, log_probs, token: str, log_prob: float) -> dict[str, float]:
    top = {token_text(tokenizer, int(t)): float(lp) for t, lp in zip(ids, log_probs)}
    top.setdefault(token, log_prob)  # the chosen token is always reported
    return top


@dataclass
class PromptPart:
    """A prompt as a choice echoes it: its text and, with logprobs, one Entry per token."""

    text: str
    entries: list[Entry]


def prompt_part(model, ids: list[int], logprobs: int | None) -> PromptPart:
    """The prompt's text and (with `logprobs`) its tokens' log-probs, scored as gpt2np.evaluate does."""
    tokenizer = model.tokenizer
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts, offsets, length = [], [], 0
    for token in ids:
        offsets.append(length)
        texts.append(decoder.decode(tokenizer.decode_single_token_bytes(token)))
        length += len(texts[-1])
    text = "".join(texts) + decoder.decode(b"", final=True)
    if logprobs is None:
        return PromptPart(text, [])
    scored = model.score(ids, top=logprobs)
    entries = [Entry(token_text(tokenizer, ids[0]), None, None, 0)]
    for i, token in enumerate(ids[1:]):
        name, lp = token_text(tokenizer, token), float(scored.log_probs[i])
        entries.append(
            Entry(name, lp, _top(tokenizer, scored.top_ids[i], scored.top_log_probs[i], name, lp), offsets[i + 1])
        )
    return PromptPart(text, entries)


# ---------------------------------------------------------------------------------------- rows and jobs
class CompletionText(RowText):
    """A choice's text as the scheduler's worker builds it, token by token, and as the handler hands
    it out: each addition is made under the job's lock and wakes the handler; with logprobs, each
    token's Entry is kept with the offset its text starts at."""

    def __init__(self, row: CompletionRow, tokenizer, stop):
        super().__init__(tokenizer, stop)
        self.row, self.entries, self.given = row, [], 0

    def add(self, token: int) -> bool:
        row, job = self.row, self.row.job
        with job.changed:
            start = len(self.text)
            stopped = super().add(token)
            if row.logprobs is not None:
                lp = row.log_probs[-1]
                name = token_text(self.tokenizer, token)
                self.entries.append(
                    Entry(
                        name, lp.log_prob, _top(self.tokenizer, lp.top_ids, lp.top_log_probs, name, lp.log_prob), start
                    )
                )
            job.changes += 1
            job.changed.notify_all()
        return stopped

    def take_entries(self, end: int) -> list[Entry]:
        """The entries of tokens whose text starts before `end`, not yet taken."""
        n = next((i for i, e in enumerate(self.entries) if e.offset >= end), len(self.entries))
        taken, self.entries = self.entries[:n], self.entries[n:]
        return taken


class CompletionRow(JobRow):
    """One choice while it decodes: a job's row that knows its index (row i * n + j is prompt i's choice j)."""

    def __init__(self, job: CompletionJob, index: int, ids: list[int], request: CompletionRequest, rng, model):
        text = CompletionText(self, model.tokenizer, request.options.stop)
        super().__init__(
            job,
            ids,
            request.options,
            rng,
            model.config.vocab_size,
            text,
            adjust=request.adjust,
            logprobs=request.logprobs,
        )
        self.index = index
        self.closed = False  # its text closed: nothing more comes
        self.reported = False  # its finish_reason handed out

    @property
    def finish_reason(self) -> str:
        return "stop" if self.sampler.ended or self.text.stopped else "length"


class CompletionJob(Job):
    """One accepted completion request: n rows per prompt, whose texts a stream reads as they grow."""

    def __init__(self, request: CompletionRequest, model):
        super().__init__()
        n = request.n
        rngs = row_generators(request.seed, len(request.prompts) * n)
        self.rows = [
            CompletionRow(self, i * n + j, ids, request, rngs[i * n + j], model)
            for i, ids in enumerate(request.prompts)
            for j in range(n)
        ]

    def on_row_finished(self) -> None:
        """Close the text of every row that has settled: a stream may hand out its end."""
        for row in self.rows:
            if row.settled and not row.closed:
                row.text.close()
                row.closed = True


# ---------------------------------------------------------------------------------------- answers
class CompletionsAPI:
    """The completions API of one served model: requests checked, jobs made, answers built."""

    def __init__(
        self,
        model,
        model_name: str,
        *,
        max_tokens_cap: int | None = None,
        max_prompts: int | None = None,
        max_token_bytes: int | None = None,
    ):
        self.model, self.model_name, self.max_tokens_cap = model, model_name, max_tokens_cap
        self.max_prompts, self.max_token_bytes = max_prompts, max_token_bytes
        self.created = int(time.time())
        self._scoring = threading.Lock()

    def parse(self, body: bytes) -> CompletionRequest:
        return parse_completion(
            body,
            self.model,
            served=self.model_name,
            max_tokens_cap=self.max_tokens_cap,
            max_prompts=self.max_prompts,
            max_token_bytes=self.max_token_bytes,
        )

    def prompt_parts(self, request: CompletionRequest) -> list[PromptPart]:
        """Each prompt's text (offsets count from it) and, to echo with logprobs, its scores; scoring
        passes run one at a time, beside the batch."""
        if not (request.echo and request.logprobs is not None):
            return [prompt_part(self.model, ids, None) for ids in request.prompts]
        with self._scoring:
            return [prompt_part(self.model, ids, request.logprobs) for ids in request.prompts]

    def job(self, request: CompletionRequest) -> CompletionJob | None:
        """The rows to decode, or None when nothing is generated (max_tokens 0)."""
        return None if request.options is None else CompletionJob(request, self.model)

    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gpt2np"}
        return {"object": "list", "data": [card]}

    def answer(self, request: CompletionRequest, job: CompletionJob | None, parts: list[PromptPart]) -> dict:
        """The whole response, once the job is done."""
        answer = _Answer(self.model_name)
        echoed = [part.text if request.echo else "" for part in parts]
        choices = [
            answer.choice(
                i * request.n + j,
                echoed[i] + (row.text.text if row else ""),
                _logprobs(request, part, row),
                row.finish_reason if row else "length",
            )
            for i, part in enumerate(parts)
            for j, row in enumerate(_rows_of(job, i, request.n))
        ]
        return answer.body(choices, usage=_usage(request, job))

    def stream(
        self, request: CompletionRequest, job: CompletionJob | None, parts: list[PromptPart]
    ) -> CompletionStream:
        return CompletionStream(request, job, parts, _Answer(self.model_name))


def _rows_of(job: CompletionJob | None, i: int, n: int) -> list:
    return [None] * n if job is None else job.rows[i * n : (i + 1) * n]


def _logprobs(request: CompletionRequest, part: PromptPart, row: CompletionRow | None) -> dict | None:
    """A whole choice's `logprobs`: the echoed prompt's tokens, then the tokens whose text starts
    before the end of the continuation (a stop string cut the rest)."""
    if request.logprobs is None:
        return None
    generated = [] if row is None else _shifted(row.text.take_entries(len(row.text.text)), len(part.text))
    return _logprobs_body(part.entries + generated)


def _logprobs_body(entries: Sequence[Entry]) -> dict:
    """OpenAI's `logprobs` object."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.log_prob for e in entries],
        "top_logprobs": [e.top for e in entries],
        "text_offset": [e.offset for e in entries],
    }


def _usage(request: CompletionRequest, job: CompletionJob | None) -> dict:
    prompt_tokens = sum(len(ids) for ids in request.prompts)
    completion_tokens = 0 if job is None else job.new_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Answer:
    """What every object of one response shares: its id, creation time and model."""

    def __init__(self, model_name: str):
        self.head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}

    def body(self, choices: list[dict], usage: dict | None = None) -> dict:
        return {**self.head, "choices": choices, **({"usage": usage} if usage is not None else {})}


def event(data) -> bytes:
    """One server-sent event: `data: <JSON>` and a blank line (the JSON holds no raw newline)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class CompletionStream:
    """A response as server-sent events: the echoed prompts first, then one event per choice for each
    piece of text decided since the last look (`take`), a choice's finish_reason with its last piece,
    and `data: [DONE]` (`close`). A job that fails mid-way ends the stream with an error event."""

    def __init__(self, request: CompletionRequest, job: CompletionJob | None, parts: list[PromptPart], answer: _Answer):
        self.request, self.job, self.parts, self.answer = request, job, parts, answer
        self.ended = job is None
        self.failed = False
        self._seen = 0  # the job's changes already taken

    def open(self) -> bytes:
        """The echoed prompts (and, with nothing to generate, each choice's end)."""
        out = b""
        n = self.request.n
        for i, part in enumerate(self.parts):
            for j in range(n):
                text = part.text if self.request.echo else ""
                logprobs = _logprobs_body(part.entries) if self.request.logprobs is not None and text else None
                finish = "length" if self.job is None else None
                if text or finish:
                    out += event(self.answer.body([self.answer.choice(i * n + j, text, logprobs, finish)]))
        return out

    def wait(self, timeout: float) -> None:
        """Until the job changes after the last `take` (at once if it already has), or `timeout` seconds."""
        with self.job.changed:
            self.job.changed.wait_for(lambda: self.job.changes != self._seen, timeout)

    def take(self) -> bytes:
        """Events for what the worker decided since the last call; `ended` once every choice has ended."""
        job, out = self.job, b""
        with job.changed:
            self._seen = job.changes
            if job.error is not None:
                self.ended = self.failed = True
                return event(error_body(job.error.status, job.error.message))
            for row in job.rows:
                out += self._piece(row)
            self.ended = all(row.reported for row in job.rows)
        return out

    def _piece(self, row: CompletionRow) -> bytes:
        piece = row.text.take()
        row.text.given += len(piece)
        end = len(row.text.text) if row.closed else row.text.given
        entries = row.text.take_entries(end) if self.request.logprobs is not None else []
        finish = row.finish_reason if row.closed and not row.reported else None
        row.reported = row.reported or row.closed
        if not (piece or entries or finish):
            return b""
        shift = len(self.parts[row.index // self.request.n].text)
        logprobs = _logprobs_body(_shifted(entries, shift)) if self.request.logprobs is not None else None
        return event(self.answer.body([self.answer.choice(row.index, piece, logprobs, finish)]))

    def fail(self, status: int, message: str) -> bytes:
        self.ended = self.failed = True
        return event(error_body(status, message))

    def close(self) -> bytes:
        """The usage (when asked) and `data: [DONE]`; nothing after an error."""
        if self.failed:
            return b""
        usage = event(self.answer.body([], usage=_usage(self.request, self.job))) if self.request.include_usage else b""
        return usage + event("[DONE]")


def _shifted(entries: list[Entry], shift: int) -> list[Entry]:
    return [Entry(e.token, e.log_prob, e.top, e.offset + shift) for e in entries]
