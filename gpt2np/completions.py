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
- A request that echoes with log-probs scores its prompts as rows of the scheduler's batch, like any
  other request: each prompt is prefilled a chunk at a time between decoding steps, its log-probs
  computed chunk by chunk (gpt2np.engine's `Row.prompt_logprobs`); `max_tokens` 0 makes score-only
  rows. So an echo request waits its turn, is cancelled when its client leaves and is bounded by
  --timeout, and delays the rows decoding by one chunk per step, never by a whole pass.
- Served under several names, the model answers to each, and an answer carries the name asked for.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .completionrequest import CompletionRequest, error_body, parse_completion, unknown_model
from .generation import RowText
from .httperrors import HTTPError, http_error
from .jobs import Job, JobRow
from .sampling import GenerationOptions, row_generators


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
    """A prompt as a choice echoes it: its text, each token's character offset and, once scored
    (with logprobs), one Entry per token."""

    text: str
    offsets: list[int]
    entries: list[Entry]


def prompt_part(tokenizer, ids: list[int]) -> PromptPart:
    """The prompt's text and its tokens' character offsets; the entries come with its scores."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts, offsets, length = [], [], 0
    for token in ids:
        offsets.append(length)
        texts.append(decoder.decode(tokenizer.decode_single_token_bytes(token)))
        length += len(texts[-1])
    return PromptPart("".join(texts) + decoder.decode(b"", final=True), offsets, [])


def prompt_entries(tokenizer, ids: list[int], part: PromptPart, scores) -> list[Entry]:
    """The echoed prompt's `logprobs` entries from its row's scores (gpt2np.scoring.LogProbs of the
    tokens after the first): the first token has none."""
    entries = [Entry(token_text(tokenizer, ids[0]), None, None, 0)]
    for i, token in enumerate(ids[1:]):
        name, lp = token_text(tokenizer, token), float(scores.log_probs[i])
        top = _top(tokenizer, scores.top_ids[i], scores.top_log_probs[i], name, lp)
        entries.append(Entry(name, lp, top, part.offsets[i + 1]))
    return entries


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
    """One choice while it decodes: a job's row that knows its index (row i * n + j is prompt i's
    choice j). The row that scores prompt i for its echo is choice i * n, or, when nothing is
    generated, a score-only row of its own (index None)."""

    def __init__(
        self,
        job: CompletionJob,
        index: int | None,
        ids: list[int],
        request: CompletionRequest,
        rng,
        model,
        *,
        score=False,
    ):
        options = request.options or SCORE_ONLY
        text = CompletionText(self, model.tokenizer, options.stop)
        super().__init__(
            job,
            ids,
            options,
            rng,
            model.config.vocab_size,
            text,
            adjust=request.adjust,
            logprobs=request.logprobs,
            prompt_logprobs=request.logprobs if score else None,
            score_only=request.options is None,
        )
        self.index = index
        self.closed = False  # its text closed: nothing more comes
        self.reported = False  # its finish_reason handed out

    @property
    def finish_reason(self) -> str:
        return "stop" if self.sampler.ended or self.text.stopped else "length"


# A row that only scores its prompt chooses no token; the engine still wants options for it.
SCORE_ONLY = GenerationOptions(max_new_tokens=1, do_sample=False)


class CompletionJob(Job):
    """One accepted completion request: n choice rows per prompt (none with max_tokens 0), whose
    texts a stream reads as they grow, and for an echo with logprobs the row that scores each prompt."""

    def __init__(self, request: CompletionRequest, model):
        super().__init__()
        n = request.n
        scoring = request.echo and request.logprobs is not None
        rngs = row_generators(request.seed, len(request.prompts) * n)
        self.choices = [
            CompletionRow(self, i * n + j, ids, request, rngs[i * n + j], model, score=scoring and j == 0)
            for i, ids in enumerate(request.prompts)
            for j in range(n)
            if request.options is not None
        ]
        if not scoring:
            self.scorers = [None] * len(request.prompts)
        elif self.choices:
            self.scorers = self.choices[::n]
        else:
            self.scorers = [CompletionRow(self, None, ids, request, None, model, score=True) for ids in request.prompts]
        self.rows = self.choices + [row for row in self.scorers if row is not None and row.index is None]

    def scored(self, i: int) -> bool:
        """Whether prompt i's echo is ready: it needs no scores, or its row has scored it."""
        return self.scorers[i] is None or self.scorers[i].prompt_scored

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
        """Each prompt's text and offsets (the scores of an echo come from its job's rows)."""
        return [prompt_part(self.model.tokenizer, ids) for ids in request.prompts]

    def job(self, request: CompletionRequest) -> CompletionJob | None:
        """The rows to run: the choices to decode, and the rows that score the prompts for an echo
        with logprobs; None when there is nothing for the model to do (max_tokens 0, no logprobs)."""
        if request.options is None and not (request.echo and request.logprobs is not None):
            return None
        return CompletionJob(request, self.model)

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
        for i, part in enumerate(parts):
            self.fill_entries(request, job, i, part)
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

    def fill_entries(self, request: CompletionRequest, job: CompletionJob | None, i: int, part: PromptPart) -> None:
        """Prompt i's echo entries from its scoring row, once it has scored it."""
        scorer = None if job is None else job.scorers[i]
        if scorer is not None and scorer.prompt_scored and not part.entries:
            part.entries = prompt_entries(self.model.tokenizer, request.prompts[i], part, scorer.prompt_scores)

    def stream(
        self, request: CompletionRequest, job: CompletionJob | None, parts: list[PromptPart]
    ) -> CompletionStream:
        return CompletionStream(self, request, job, parts, _Answer(request.model))


def _rows_of(job: CompletionJob | None, i: int, n: int) -> list:
    return [None] * n if job is None or not job.choices else job.choices[i * n : (i + 1) * n]


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
    """A response as server-sent events: each prompt's echo first (for an echo with logprobs, once its
    row has scored it), then one event per choice for each piece of text decided since the last look
    (`take`), a choice's finish_reason with its last piece, and `data: [DONE]` (`close`). A job that
    fails mid-way ends the stream with an error event."""

    def __init__(
        self, api: CompletionsAPI, request: CompletionRequest, job: CompletionJob | None, parts, answer: _Answer
    ):
        self.api, self.request, self.job, self.parts, self.answer = api, request, job, parts, answer
        self.ended = job is None
        self.failed = False
        self._seen = 0  # the job's changes already taken
        self._echoed = [False] * len(parts)  # prompt i's echo handed out

    def open(self) -> bytes:
        """The echoes that are ready (all of them, with nothing for the model to do)."""
        return self._echoes()

    def _echoes(self) -> bytes:
        out = b""
        n, generating = self.request.n, self.job is not None and bool(self.job.choices)
        for i, part in enumerate(self.parts):
            if self._echoed[i] or (self.job is not None and not self.job.scored(i)):
                continue
            self._echoed[i] = True
            self.api.fill_entries(self.request, self.job, i, part)
            for j in range(n):
                text = part.text if self.request.echo else ""
                logprobs = _logprobs_body(part.entries) if self.request.logprobs is not None and text else None
                finish = None if generating else "length"
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
            out += self._echoes()
            for row in job.choices:
                if self._echoed[row.index // self.request.n]:  # a choice's text comes after its prompt's echo
                    out += self._piece(row)
            self.ended = all(self._echoed) and all(row.reported for row in job.choices)
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
