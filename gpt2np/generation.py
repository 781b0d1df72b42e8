"""Text generation: the library's `generate`, `generate_ids` and `stream`, as loops over the engine.

Each prompt becomes a row of one `gpt2np.engine.Engine` batch (prompts of different lengths are
left-padded, so every row produces what it would produce alone). Each step chooses one token for
every live row; the loop turns the tokens into text, looks for stop strings, and finishes the rows
that met one. Rows that finish leave the batch, so they stop costing work.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .engine import Engine, Row, TokenLogProb
from .sampling import GenerationOptions, LogitAdjustments


# ---------------------------------------------------------------------------------------- text
class RowText:
    """One row's continuation as text: bytes are decoded as they arrive (a character split across
    tokens waits for its last byte), stop strings are looked for, and `take()` hands out the part
    of the text that is decided (nothing that a stop string could still remove)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.stopped = False
        self._given = 0  # characters already handed out by take()
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string has now appeared (the text is cut before it)."""
        return self._extend(self._decoder.decode(self.tokenizer.decode_single_token_bytes(token)))

    def close(self) -> None:
        """No more tokens: an unfinished character at the end becomes U+FFFD."""
        if not self.stopped:
            self._extend(self._decoder.decode(b"", final=True))
            self._holdback = 0

    def _extend(self, piece: str) -> bool:
        if self.stopped or not piece:
            return self.stopped
        searched_to = max(0, len(self.text) - self._holdback)  # a new match must end in the new piece
        self.text += piece
        hits = [i for i in (self.text.find(s, searched_to) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped, self._holdback = True, 0
        return self.stopped

    def take(self) -> str:
        """The text decided since the last call."""
        end = len(self.text) - (0 if self.stopped else self._holdback)
        if end <= self._given:
            return ""
        piece, self._given = self.text[self._given : end], end
        return piece


def prepare_prompts(tokenizer, prompts, *, bos: int) -> list[list[int]]:
    """Encode prompt strings; special-token text in a prompt is the special token, as in transformers.
    An empty prompt is conditioned on <|endoftext|>, the token GPT-2 saw before every document."""
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings; prompt {i} is {type(p).__name__}")
        out.append(tokenizer.encode(p, allowed_special="all") or [bos])
    return out


def check_prompts(prompt_or_prompts) -> tuple[list[str], bool]:
    if isinstance(prompt_or_prompts, str):
        return [prompt_or_prompts], True
    if not isinstance(prompt_or_prompts, (list, tuple)):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt_or_prompts).__name__}")
    if not prompt_or_prompts:
        raise ValueError("the list of prompts is empty; pass at least one prompt")
    return list(prompt_or_prompts), False


class TextRow(Row):
    """A row of a generation call: the ids it produced and its text so far."""

    def __init__(self, ids: Sequence[int], options: GenerationOptions, rng, model, adjust=None, *, logprobs=None):
        super().__init__(ids, options, rng, model.config.vocab_size, adjust, logprobs=logprobs)
        self.text = RowText(model.tokenizer, options.stop)

    def accept(self, token: int) -> None:
        if self.text.add(token):  # a stop string: the row ends at this token
            self.finish()

    @property
    def finish_reason(self) -> str:
        """OpenAI's words for why the row ended: "stop" (EOS or a stop string) or "length" (max_new_tokens)."""
        return "stop" if self.sampler.ended or self.text.stopped else "length"


def text_rows(
    model, prompts: Sequence[Sequence[int]], options: GenerationOptions, rngs, adjust=None, *, logprobs=None
) -> list[TextRow]:
    return [TextRow(ids, options, rng, model, adjust, logprobs=logprobs) for ids, rng in zip(prompts, rngs)]


def run(model, rows: list[TextRow]) -> Iterator[list[TextRow]]:
    """Decode the rows in one batch, yielding after each step the rows that produced tokens (their ids
    in `row.new_ids`, their text already in `row.text`: `TextRow.accept`). A row whose text met a
    stop string is finished. Every prompt is checked (ids, context) when the first step is asked for."""
    engine = Engine(model)
    engine.add(rows)
    while engine.rows:
        yield list({id(row): row for row, _ in engine.choose()}.values())
        engine.forward()
    for row in rows:
        row.text.close()


def generate_text(model, prompts: list[str], options: GenerationOptions, rngs, *, return_full_text: bool) -> list[str]:
    """Generate for each prompt; the continuation is cut at the first stop string."""
    rows = text_rows(model, prepare_prompts(model.tokenizer, prompts, bos=model.config.bos_token_id), options, rngs)
    for _ in run(model, rows):
        pass
    return [p + r.text.text if return_full_text else r.text.text for p, r in zip(prompts, rows)]


def generate_ids(model, prompts: Sequence[Sequence[int]], options: GenerationOptions, rngs) -> list[list[int]]:
    """New ids per prompt, without the EOS; with stop strings, up to the token that completed one."""
    rows = text_rows(model, prompts, options, rngs)
    for _ in run(model, rows):
        pass
    return [r.new_ids for r in rows]


def stream_text(model, prompt: str, options: GenerationOptions, rng, *, return_full_text: bool) -> Iterator[str]:
    """Pieces of text as they are decided; they join to what `generate_text` returns."""
    (row,) = text_rows(model, prepare_prompts(model.tokenizer, [prompt], bos=model.config.bos_token_id), options, [rng])
    steps = run(model, [row])
    stepped = next(steps, None)  # the prompt is checked before anything is yielded
    if return_full_text and prompt:
        yield prompt
    while stepped is not None:
        piece = row.text.take()
        if piece:
            yield piece
        stepped = next(steps, None)
    piece = row.text.take()  # the tail held back until the row ended
    if piece:
        yield piece


@dataclass(frozen=True)
class Completion:
    """One prompt's continuation with what `GPT2.generate` leaves out: its prompt and new ids (EOS not
    included; with a stop string, up to the token that completed it), the continuation's text (cut
    before the stop string), why it ended ("stop": EOS or a stop string; "length": max_new_tokens),
    and with `logprobs`, one `TokenLogProb` per new id."""

    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish_reason: str
    log_probs: list[TokenLogProb] | None


def complete(
    model,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    rngs,
    adjust: LogitAdjustments,
    *,
    logprobs: int | None,
) -> list[Completion]:
    """Generate for each prompt's ids, keeping ids, text, finish reason and (with `logprobs`) log-probs."""
    rows = text_rows(model, prompts, options, rngs, adjust, logprobs=logprobs)
    for _ in run(model, rows):
        pass
    return [
        Completion(list(r.ids), r.new_ids, r.text.text, r.finish_reason, None if logprobs is None else r.log_probs)
        for r in rows
    ]
