"""The GPT-2 model card's endpoint, `POST /score`: a body of prompts and params in, one text per prompt out.

    {"input_data": ["My name is John and I am", "Once upon a time,"],
     "params": {"top_p": 1.0, "temperature": 0.8, "max_new_tokens": 100, "do_sample": true,
                "return_full_text": true}}

Azure ML's shape of the same body, `{"input_data": {"input_string": [...], "parameters": {...}}}`,
is read too; gpt2np.request checks both, with the same messages as `gpt2np generate --json`. The
route is named `/score` because the model card names it so, but it generates text: nothing here
computes log-probabilities (that is gpt2np.scoring's). Here are the server's own checks of such a
request (what can be refused before tokenizing, then the context rule), the job a request becomes
(`CardJob`, decoded by gpt2np.scheduler like every job) and its answer.
"""

from __future__ import annotations

import json

from .engine import check_fits
from .generation import RowText
from .httperrors import HTTPError
from .jobs import Job, JobRow
from .request import Request, RequestError, check_prompt_bytes, parse_request
from .sampling import GenerationOptions, row_generators


def parse_card_request(body: bytes) -> Request:
    """The body in the model card's format, flat or Azure ML's; a 400 naming the field otherwise."""
    try:
        return parse_request(body)
    except RequestError as e:
        raise HTTPError(400, str(e)) from None


def check_size(request: Request, n_ctx: int, max_token_bytes: int, max_prompts: int) -> None:
    """What can be refused before tokenizing, which costs seconds for a 300 KB word: too many prompts,
    or a prompt with more UTF-8 bytes than the context can hold (a token is at most `max_token_bytes`
    bytes, so a prompt of b bytes is at least b / max_token_bytes tokens). The finer rule, with
    max_new_tokens, needs the tokens: `check_lengths`."""
    if len(request.prompts) > max_prompts:
        raise HTTPError(
            400,
            f"{request.prompts_field} has {len(request.prompts)} prompts; this server takes at most "
            f"{max_prompts} per request (its --max-prompts): split them over several requests",
        )
    for i, prompt in enumerate(request.prompts):
        try:
            check_prompt_bytes(prompt, request.prompt_field(i), n_ctx=n_ctx, max_token_bytes=max_token_bytes)
        except RequestError as e:
            raise HTTPError(400, str(e)) from None


def check_lengths(request: Request, ids: list[list[int]], n_ctx: int, cap: int | None) -> None:
    """The longest prompt and max_new_tokens must fit the context (the one rule: engine.check_fits),
    and max_new_tokens must be within this server's cap; a 400 names whichever limit is the tighter."""
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    n, max_new_tokens, field = len(ids[longest]), request.options.max_new_tokens, request.param_field("max_new_tokens")
    if cap is not None and cap < max_new_tokens and n + cap <= n_ctx:  # lowering it to the cap would fit
        rule = f"must be at most {cap} here (this server's --max-new-tokens-cap)"
        raise HTTPError(400, f"{field} {rule}, got {max_new_tokens}")
    try:
        check_fits(n, max_new_tokens, n_ctx, what=request.prompt_field(longest), limit=field)
    except ValueError as e:
        raise HTTPError(400, str(e)) from None


class CardJob(Job):
    """One accepted /score request: a row per prompt, each generating text; its answer is the list of texts."""

    def __init__(
        self, prompts: list[str], ids: list[list[int]], options: GenerationOptions, seed, return_full_text: bool, model
    ):
        super().__init__()
        self.prompts, self.return_full_text = prompts, return_full_text
        rngs = row_generators(seed, len(prompts))
        vocab_size, tokenizer = model.config.vocab_size, model.tokenizer
        self.rows = [
            JobRow(self, p, options, rng, vocab_size, RowText(tokenizer, options.stop)) for p, rng in zip(ids, rngs)
        ]
        self.texts: list[str] | None = None

    def on_finished(self) -> None:
        for row in self.rows:
            row.text.close()
        texts = [row.text.text for row in self.rows]
        self.texts = [p + t for p, t in zip(self.prompts, texts)] if self.return_full_text else texts


def card_answer(job: CardJob) -> tuple[bytes, dict[str, str]]:
    """A finished job's answer: the texts as a JSON list, and whether other requests shared its batch."""
    body = json.dumps(job.texts, ensure_ascii=False).encode("utf-8")
    return body, {"X-Shared-Batch": "true" if job.shared else "false"}
