"""OpenAI's completions API (the legacy `POST /v1/completions`) over gpt2np's engine: the rows a
checked request becomes (gpt2np.completionrequest checks it), its job, and the answers, whole or as
server-sent events; and the model list (`GET /v1/models`, `GET /v1/models/{id}`).

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
- Served under several names, the model answers to each, and an answer carries the name asked for.
"""

from __future__ import annotations

import codecs
import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .completionrequest import CompletionRequest, error_body, parse_completion, unknown_model
from .generation import RowText
from .httperrors import HTTPError, http_error
from .jobs import Job, JobRow
from .sampling import row_generators


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
    """The completions API of one served model, under one or more names (`--served-model-name`; the
    first is the one /health shows): requests checked, jobs made, answers built."""

    def __init__(
        self,
        model,
        model_names: str | Sequence[str],
        *,
        max_tokens_cap: int | None = None,
        max_prompts: int | None = None,
        max_token_bytes: int | None = None,
    ):
        self.model_names = (model_names,) if isinstance(model_names, str) else tuple(dict.fromkeys(model_names))
        if not self.model_names:
            raise ValueError("a served model needs at least one name")
        self.model, self.max_tokens_cap = model, max_tokens_cap
        self.max_prompts, self.max_token_bytes = max_prompts, max_token_bytes
        self.created = int(time.time())
        self._scoring = threading.Lock()

    def parse(self, body: bytes) -> CompletionRequest:
        return parse_completion(
            body,
            self.model,
            served=self.model_names,
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
        """GET /v1/models: every name the model is served under."""
        return {"object": "list", "data": [self._card(name) for name in self.model_names]}

    def model_card(self, name: str) -> dict:
        """GET /v1/models/{name}: the model object, or a 404 in OpenAI's shape for a name not served."""
        if name not in self.model_names:
            raise unknown_model(name, self.model_names)
        return self._card(name)

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "gpt2np"}

    def answer(self, request: CompletionRequest, job: CompletionJob | None, parts: list[PromptPart]) -> dict:
        """The whole response, once the job is done."""
        answer = _Answer(request.model)
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
        return CompletionStream(request, job, parts, _Answer(request.model))


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
                return self.fail(http_error(job.error))
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

    def fail(self, error: HTTPError) -> bytes:
        """The event that ends a stream whose job failed (OpenAI's error shape; no [DONE] follows)."""
        self.ended = self.failed = True
        return event(error_body(error.status, error.message, error.param, error.code))

    def close(self) -> bytes:
        """The usage (when asked) and `data: [DONE]`; nothing after an error."""
        if self.failed:
            return b""
        usage = event(self.answer.body([], usage=_usage(self.request, self.job))) if self.request.include_usage else b""
        return usage + event("[DONE]")


def _shifted(entries: list[Entry], shift: int) -> list[Entry]:
    return [Entry(e.token, e.log_prob, e.top, e.offset + shift) for e in entries]
