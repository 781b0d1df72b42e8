"""The engine: the one place that lays out a KV cache and runs the transformer with it.

Everything in gpt2np that produces or scores tokens is a loop over this module:

- `GPT2.generate`, `generate_ids` and `stream` (gpt2np.generation) add their prompts to an
  `Engine` and step it until every row is done;
- the server's scheduler (gpt2np.server) adds the rows of arriving requests between two steps of
  the same `Engine` and steps it for all of them (continuous batching, as TGI and vLLM do it);
- scoring (gpt2np.evaluate) asks for the hidden states of whole sequences (`hidden_states`) or of
  several continuations of one context run once into a cache (`continuation_states`).

The continuous batch: `add(rows)` prefills the rows' prompts in one left-padded pass and lets them
join; `choose()` picks one token for every live row from its logits; the caller may then `finish()`
rows (a stop string, a client gone); `forward()` drops the rows that are done and feeds the others
their token, one [B, 1] pass. A row ends at EOS, at its `max_new_tokens`, or when finished.

Chunked prefill: an Engine made with `prefill_chunk=N` prefills prompts that would take more than
N tokens in one pass a chunk of at most N tokens per `forward()`, after that step's decoding pass,
so a long prompt delays the rows already decoding by one chunk per step instead of by its whole
prefill (and the prefill's scores stay chunk x S instead of L x L). Such rows are `prefilling`
until their last chunk has run; then they join the batch, their first logits ready for `choose`.
Each chunk writes its keys and values at its columns of the rows' own cache, so the result is the
one-pass prefill up to float rounding.

The cache layout: one buffer [n_layer, 2, B, H, S, D] holds every layer's keys and values for B
rows over S columns. Rows are right-aligned: every row's next token is written to the same column,
`end`, so one step is one pass over [B, 1] tokens. A row with a shorter history has padding
columns on its left; `valid` [B, S] says which columns hold real tokens and the attention mask
hides the others. Positions count from each row's first real token, so padding changes nothing
but float rounding. When rows join or leave, the kept columns are copied into a new, tight buffer
with room for the tokens the rows may still feed back.

Unwritten cache columns, the one rule: every buffer is allocated with np.zeros. A padding column
that no pass wrote then holds zeros, and its masked attention weight, exactly 0, multiplies a 0
(0 * uninitialised memory could be NaN). Columns at or past `end` are never read. np.zeros maps
zero pages lazily, so the room reserved for tokens to come costs no memory until it is written.

Shape letters as in gpt2np.model: B rows, T new positions, S cache columns, C channels, H heads,
D head size, V vocabulary; b and w are the rows and columns of a part being laid out.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import runner, scoring
from .model import causal_mask, gpt2, lm_head
from .sampling import GenerationOptions, LogitAdjustments, RowSampler

# A step with this many rows to sample (or more) samples them on the model's threads, a band of rows
# each: a row's top_p sort takes about 0.5 ms, the hand-out about 0.03 ms.
SAMPLER_MIN_ROWS = 4


def check_fits(
    n_prompt: int, max_new_tokens: int, n_ctx: int, *, what: str = "the prompt", limit: str = "max_new_tokens"
) -> None:
    """The context rule, stated once: a prompt and the tokens generated after it must fit the
    model's context. Raises a ValueError naming both numbers and the fix; `what` names the prompt
    and `limit` the option as the caller's user spells them."""
    tokens = f"{n_prompt} token{'s' if n_prompt != 1 else ''}"
    room = n_ctx - max_new_tokens  # the longest prompt that fits with max_new_tokens
    if n_prompt >= n_ctx:  # only a shorter prompt can fit
        fix = (
            f"shorten it to at most {room} tokens (with {limit} {max_new_tokens})"
            if room >= 1
            else f"shorten it and lower {limit}: together they may take {n_ctx} tokens"
        )
        raise ValueError(
            f"{what} is {tokens}, which leaves no room to generate in the model's {n_ctx}-token context; {fix}"
        )
    if n_prompt > room:
        shorter = f" or shorten the prompt to {room} tokens" if room >= 1 else ""
        raise ValueError(
            f"{what} is {tokens} and {limit} is {max_new_tokens}, more than the model's "
            f"{n_ctx}-token context together; lower {limit} to {n_ctx - n_prompt}{shorter}"
        )


def left_pad(prompts: Sequence[Sequence[int]]):  # B prompts -> [B, L] ids, [B, L] valid, [B, L] positions
    """Prompts of different lengths as one batch, right-aligned so that every row's next token
    goes in the same column: padding (id 0, any valid id would do) on the left, `valid` False
    there, and positions counting from each row's first real token."""
    lengths = np.array([len(p) for p in prompts])
    L = int(lengths.max())
    pad = L - lengths
    ids = np.zeros((len(prompts), L), dtype=np.intp)
    valid = np.arange(L)[None, :] >= pad[:, None]
    for b, p in enumerate(prompts):
        ids[b, pad[b] :] = p
    positions = np.maximum(np.arange(L)[None, :] - pad[:, None], 0)
    return ids, valid, positions


def new_cache(config, rows: int, columns: int) -> np.ndarray:  # -> [n_layer, 2, B, H, S, D] zeros
    """A KV cache for `rows` rows over `columns` columns (zeros: see the module's rule)."""
    return np.zeros((config.n_layer, 2, rows, config.n_head, columns, config.head_size), dtype=np.float32)


def copy_rows(out, cache, rows) -> None:  # [n_layer, 2, b, H, w, D] <- rows of [n_layer, 2, B, H, w, D]
    """out[:, :, j] = cache[:, :, rows[j]], row by row: straight from one buffer into the other
    (`cache[:, :, rows]` would first copy the rows into a temporary, then copy them again)."""
    for j, i in enumerate(rows):
        out[:, :, j] = cache[:, :, i]


# ---------------------------------------------------------------------------------------- whole sequences
def run(model, ids, positions, mask, *, kv_cache=None, start=0, head=None):  # [B, T] -> [B, T, C], logits
    """One pass of the trunk (`gpt2np.model.gpt2`) in the model's threads context, which decides
    from the pass's size whether it runs on the pool: the hidden states, and the logits of the last
    position (`head="last"`, [B, V]) or of every position (`head="all"`, [B, T, V]) or None."""
    B, T = ids.shape
    with model.threads.forward(B * T) as pool:
        if pool is None:  # a short pass (every decoding step), or threads=1: model.py as written
            x = gpt2(ids, positions, model.params, model.config, mask=mask, kv_cache=kv_cache, start=start)
            head_fn = lm_head
        else:  # the same steps, each split over the pool
            x = runner.gpt2(pool, ids, positions, model.params, model.config, mask=mask, kv_cache=kv_cache, start=start)
            head_fn = functools.partial(runner.lm_head, pool)
        if head is None:
            return x, None
        return x, head_fn(x[:, -1] if head == "last" else x, model.lm_head_weight)


def logits(model, ids) -> np.ndarray:  # [B, T] -> [B, T, V]
    """Logits for every position of a batch of equal-length sequences, no cache."""
    return _whole(model, ids, head="all")[1]


def hidden_states(model, ids) -> np.ndarray:  # [B, L] -> [B, L, C]
    """The trunk's output for every position, no cache. Rows may be right-padded: attention is
    causal, so a real position never sees the padding after it."""
    return _whole(model, ids)[0]


def _whole(model, ids, head=None):  # [B, L] -> [B, L, C], logits
    B, L = ids.shape
    return run(
        model, ids, np.broadcast_to(np.arange(L), (B, L)), causal_mask(np.ones((B, L), dtype=bool), 0, L), head=head
    )


def continuation_states(
    model, context: Sequence[int], targets: Sequence[Sequence[int]], *, batch_size: int
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """The hidden states that predict each target's tokens after a shared context, the context run
    once: per batch of targets, (how many, [per target: [len(target), C]]).

    The context goes through the model once into row 0 of a cache; its keys and values are copied
    into `batch_size` rows, and each batch of targets runs from the context's end, right-padded
    (causality hides the padding), overwriting only the columns after the context. Every target
    must fit after the whole context in the model's window.
    """
    config = model.config
    P = len(context)
    S = P + max(len(t) for t in targets) - 1  # a target's last token is predicted, never read
    rows = min(batch_size, len(targets))
    cache = new_cache(config, rows, S)
    context_ids = np.asarray(context, dtype=np.intp)[None]
    x, _ = run(
        model, context_ids, np.arange(P)[None], causal_mask(np.ones((1, P), dtype=bool), 0, P), kv_cache=cache[:, :, :1]
    )
    last = x[0, -1]  # [C]: predicts every target's first token
    cache[:, :, 1:, :, :P] = cache[:, :, :1, :, :P]  # the context's keys and values in every row
    for s in range(0, len(targets), rows):
        batch = [np.asarray(t, dtype=np.intp) for t in targets[s : s + rows]]
        B, T = len(batch), max(len(t) for t in batch) - 1  # each target but its last token is read
        if T > 0:
            tokens = np.zeros((B, T), dtype=np.intp)  # right padding: causality hides it
            for b, t in enumerate(batch):
                tokens[b, : len(t) - 1] = t[:-1]
            positions = np.broadcast_to(np.arange(P, P + T), (B, T))
            mask = causal_mask(np.ones((B, P + T), dtype=bool), P, T)
            y, _ = run(model, tokens, positions, mask, kv_cache=cache[:, :, :B], start=P)
        yield (
            B,
            [
                np.concatenate([last[None], y[b, : len(t) - 1]]) if len(t) > 1 else last[None]
                for b, t in enumerate(batch)
            ],
        )


# ---------------------------------------------------------------------------------------- the batch
@dataclass(frozen=True)
class TokenLogProb:
    """One chosen token's log-probability under the model, and the `k` most likely tokens' (most
    likely first), all natural logs of the model's own distribution (see `Row.logprobs`)."""

    token: int
    log_prob: float
    top_ids: np.ndarray  # [k]
    top_log_probs: np.ndarray  # [k] float64


class Row:
    """One sequence being decoded: its prompt ids, its sampler (options, random generator, tokens
    chosen) and whether the caller has finished it. Callers subclass it to carry their own state
    (the text so far, the request it belongs to).

    A row that sets `logprobs` to k (0 to 5: the chosen token only, or with the k most likely) gets
    a `TokenLogProb` in `log_probs` for every token it produces. They are of the model's own
    distribution, the raw logits before any penalty, bias, temperature, top-k or top-p (as OpenAI
    and vLLM report them): what scoring the same text gives, whatever the sampler did.

    A row that sets `prompt_logprobs` to k gets its prompt scored while it is prefilled (a chunk at
    a time, with the engine's `prefill_chunk`): `prompt_scores` is then the log-probs of its prompt's
    tokens after the first, as `GPT2.score` gives them (gpt2np.scoring). With `score_only` the row
    ends there, choosing no token: scoring a prompt as one more row of the batch.
    """

    def __init__(
        self,
        ids: Sequence[int],
        options: GenerationOptions,
        rng: np.random.Generator,
        vocab_size: int,
        adjust: LogitAdjustments | None = None,
        *,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        score_only: bool = False,
    ):
        self.ids = list(ids)
        self.sampler = RowSampler(self.ids, options, rng, vocab_size, adjust)
        self.finished = False  # set by finish(): the row leaves at the next forward()
        self.token: int | None = None  # the token chosen at the last step, fed at the next
        self.logprobs = logprobs  # None: no log-probs asked (nothing is computed for the row)
        self.log_probs: list[TokenLogProb] = []
        self.prompt_logprobs = 0 if score_only and prompt_logprobs is None else prompt_logprobs
        self.score_only = score_only
        self.prompt_scored = False  # its prompt has been scored (with prompt_logprobs), every chunk of it
        self._prompt_parts: list[scoring.LogProbs] = []
        self.drafts: list[int] = []  # the tokens guessed after `token` at the last forward (prompt lookup)
        self.fed = 0  # columns the last forward fed for the row when it fed drafts (its token and drafts)
        self.produced_now = 0  # tokens produced at the last choose()
        self._tokens = np.empty(len(self.ids) + options.max_new_tokens, dtype=np.intp)  # prompt, then chosen
        self._tokens[: len(self.ids)] = self.ids
        self._n = len(self.ids)

    def accept(self, token: int) -> None:
        """Called by the engine for every token the row produces, in order, before it goes on (a step
        that verifies drafts produces several): a subclass adds it to its text, and may `finish` the
        row there (a stop string), which ends the row's tokens at that one."""

    def history(self) -> np.ndarray:  # -> [len(ids) + n_new]
        """The prompt and every token the row produced, in order (a view)."""
        return self._tokens[: self._n]

    @property
    def new_ids(self) -> list[int]:
        """The tokens the row produced (EOS not included)."""
        return self._tokens[len(self.ids) : self._n].tolist()

    def _produced(self, token: int) -> None:
        self._tokens[self._n] = token
        self._n += 1
        self.accept(token)

    @property
    def prompt_scores(self) -> scoring.LogProbs | None:
        """The prompt's tokens after the first, scored (with `prompt_logprobs`), once prefilled."""
        if self.prompt_logprobs is None:
            return None
        if not self._prompt_parts:  # a one-token prompt: nothing to score
            return scoring.empty(0, self.prompt_logprobs)
        return scoring.LogProbs(*(np.concatenate(field) for field in zip(*self._prompt_parts)))

    @property
    def options(self) -> GenerationOptions:
        return self.sampler.options

    @property
    def n_new(self) -> int:
        return self.sampler.n_new

    @property
    def done(self) -> bool:
        """No more tokens: EOS drawn, max_new_tokens reached, or finished."""
        return self.finished or self.sampler.done

    def finish(self) -> None:
        self.finished = True


@dataclass
class _Part:
    """Rows and their decoding state, to be laid out into a batch: a cache over w columns in which
    the rows' tokens are right-aligned, which columns hold real tokens, each row's next position and
    its logits for the next token."""

    rows: list[Row]
    cache: np.ndarray  # [n_layer, 2, B, H, w, D], of which rows `cache_rows` are these rows
    cache_rows: np.ndarray  # [b]
    valid: np.ndarray  # [b, w]
    positions: np.ndarray  # [b]
    logits: np.ndarray  # [b, V]


class Engine:
    """A continuous batch of rows over one model and one KV cache (see the module's docstring).

    `add` rows at any step, `choose` a token for every live row, `finish` rows if need be,
    `forward` one step; `rows` is empty when every row is done.
    """

    def __init__(self, model, *, prefill_chunk: int | None = None):
        self.model = model
        self.prefill_chunk = prefill_chunk  # tokens prefilled per step; None: every prompt in one pass
        self.prefilling: list[_Prefill] = []  # rows whose prompts are prefilled a chunk per step
        self.eos = model.config.eos_token_id
        # Ids the model may have (a padded vocabulary) but the tokenizer cannot decode are never chosen.
        self.n_choosable = min(model.config.vocab_size, model.tokenizer.n_vocab)
        self._clear()

    def _clear(self) -> None:
        self.state: _Part | None = None
        self.end = 0  # the column every row's next token is written to
        self._layouts = 0  # layouts made so far (a layout moves the columns of the last step)
        self._step = (0, 1)  # after a forward: (the layouts made by then, the columns T it fed each row)

    @property
    def rows(self) -> list[Row]:
        return [] if self.state is None else self.state.rows

    @property
    def logits(self) -> np.ndarray:  # [B, V]
        """Each row's logits for its next token, row i for `rows[i]`; `choose` processes them in
        place (read them before it)."""
        return self.state.logits

    def check(self, row: Row) -> None:
        """A ValueError unless the row's prompt is valid ids that fit the context with its max_new_tokens."""
        config, ids = self.model.config, row.ids
        if not ids:
            raise ValueError("a prompt must have at least one token")
        if min(ids) < 0 or max(ids) >= config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {config.vocab_size}), got {min(ids)}..{max(ids)}")
        if row.score_only:  # its last token predicts nothing it needs: the whole context may be prompt
            if len(ids) > config.n_ctx:
                raise ValueError(f"the prompt is {len(ids)} tokens, more than the model's {config.n_ctx}-token context")
        else:
            check_fits(len(ids), row.options.max_new_tokens, config.n_ctx)
        adjust = row.sampler.adjust
        bad = [t for t, _ in adjust.logit_bias if t >= config.vocab_size] if adjust else []
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {config.vocab_size}), got {bad[0]}")

    @property
    def waiting(self) -> list[Row]:
        """Rows still being prefilled a chunk per step: not yet in `rows`."""
        return [row for p in self.prefilling for row in p.rows]

    @property
    def busy(self) -> bool:
        """Whether a `choose` + `forward` step has anything to do."""
        return bool(self.rows or self.prefilling)

    def add(self, rows: Sequence[Row]) -> None:
        """Prefill the prompts of `rows` in one left-padded pass and let them join the batch; their
        logits for their first new token are ready for the next `choose`. With `prefill_chunk`, rows
        whose pass would exceed it are prefilled over the next `forward` calls instead."""
        for row in rows:
            self.check(row)
        if self.prefill_chunk is not None and len(rows) * max(len(r.ids) for r in rows) > self.prefill_chunk:
            self.prefilling.append(_Prefill(self.model, list(rows)))
            return
        if self.state is None:  # the rows are the whole batch: prefill straight into its buffer
            self.state = self._prefill(list(rows), room=_room(rows, pending=False))
            self.end = self.state.valid.shape[1] - _room(rows, pending=False)
        else:
            self._lay_out([self._used(range(len(self.rows))), self._prefill(list(rows), room=0)], pending=False)

    def choose(self) -> list[tuple[Row, int]]:
        """The next tokens of every live row, chosen by its sampler from its logits: (row, token) for
        each token a row produced, in order; each row `accept`s its tokens as they come. A row that
        drew EOS (not returned) or reached max_new_tokens is done and leaves at the next `forward`.

        After a forward that fed drafts (prompt lookup), a row produces one token or more: its
        sampler decides on the token after the fed one, and while that token is the next draft, on
        the token after it too (`RowSampler.choose` with the draft: greedy, or the speculative
        sampling rule). The drafts it did not keep are rolled back from the cache."""
        if self.state is None:
            return []
        logits = self.state.logits  # [B, V], or [B, T, V] after drafts were fed
        live = [(i, row) for i, row in enumerate(self.rows) if not row.done]
        if logits.ndim == 3:
            kept = np.zeros(len(self.rows), dtype=np.intp)  # 0: not in the step that fed drafts
            for i, row in live:  # in order, on this thread: each row's `accept` may finish it
                kept[i] = self._verify(row, logits[i])
            self._roll_back(kept)
        else:

            def pick(rows):  # each row draws from its own generator: which thread runs it changes nothing
                for i, row in live[rows]:
                    row.produced_now = 0
                    row.token = self._choose(row, logits[i])

            pool = self.model.threads.pool if len(live) >= SAMPLER_MIN_ROWS else None
            runner.parallel(pool, pick, runner.pieces(len(live), pool))
            for _, row in live:  # each row takes its token on this thread
                if row.token is not None:
                    row._produced(row.token)
        return [(row, int(token)) for _, row in live for token in row.history()[row._n - row.produced_now :]]

    def _choose(self, row: Row, logits, draft: int | None = None) -> int | None:  # [V] -> token
        """The row's next token from `logits` (the sampler changes them), with its log-prob if asked."""
        logits = logits[: self.n_choosable]
        raw = None if row.logprobs is None else logits.copy()  # the sampler changes them
        token = row.sampler.choose(logits, self.eos, draft=draft)
        row.produced_now += token is not None
        if token is not None and raw is not None:
            scored = scoring.log_probs(raw[None], np.array([token]), top=row.logprobs)
            row.log_probs.append(
                TokenLogProb(token, float(scored.log_probs[0]), scored.top_ids[0], scored.top_log_probs[0])
            )
        return token

    def _verify(self, row: Row, logits) -> int:  # [T, V] -> columns of the step the row keeps
        """The row's tokens after a forward that fed its last token and its drafts: one from each
        position's logits while the token chosen there is the draft fed next. Returns how many of the
        step's columns the row keeps (the fed token's and the drafts' it accepted), 0 for a row that
        joined after that forward (it chooses from its own logits, at position 0)."""
        row.produced_now = 0
        fed, row.fed = row.fed, 0
        drafts = row.drafts if fed else []
        for j in range(1 + len(drafts)):
            draft = drafts[j] if j < len(drafts) else None
            row.token = self._choose(row, logits[j], draft)
            if row.token is None:  # EOS ended the row
                break
            row._produced(row.token)
            if row.done or row.token != draft:
                break
        return min(fed, j + 1)

    def forward(self) -> None:
        """Drop the rows that are done; feed every other row the token it chose: one decoding step,
        which refreshes every row's logits. Then one chunk of the oldest prompts being prefilled."""
        if self.state is not None:
            self._decode()
        if self.prefilling:
            self._prefill_chunk()

    def _prefill_chunk(self) -> None:
        """Run the next chunk of the oldest rows being prefilled; once their prompts are all in, they
        join the batch with room for their tokens to come."""
        self.prefilling = [p for p in self.prefilling if not all(row.done for row in p.rows)]  # finished meanwhile
        if not self.prefilling:
            return
        part = self.prefilling[0].run(self.model, self.prefill_chunk)
        if part is None:
            return
        self.prefilling.pop(0)
        L = part.valid.shape[1] - _room(part.rows, pending=False)
        if self.state is None:  # the rows are the whole batch: their cache has the room, no copy
            self.state, self.end = part, L
            return
        part = _Part(
            part.rows, part.cache[:, :, :, :, :L], part.cache_rows, part.valid[:, :L], part.positions, part.logits
        )
        self._lay_out([self._used(range(len(self.rows))), part], pending=False)

    def _decode(self) -> None:
        """The decoding pass of `forward`: each row's chosen token, and its drafts if it has any."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) < len(self.rows):
            if not keep:
                self._clear()
                return
            self._lay_out([self._used(keep)], pending=True)
        s = self.state
        for i, row in enumerate(s.rows):
            row.drafts = prompt_lookup(row, int(s.positions[i]), self.model.config.n_ctx)
        T = 1 + max(len(row.drafts) for row in s.rows)
        if self.end + T > s.valid.shape[1]:  # drafts left padding behind: lay the rows out tight again
            self._lay_out([self._used(range(len(s.rows)))], pending=True, tight=True)
            s = self.state
        start = self.end
        # Room: a layout leaves space for every token its rows may still feed (`_room`), and each
        # forward feeds one token per row that chose one and is not done, with its drafts (no more
        # than the row may still produce).
        assert start + T <= s.valid.shape[1], "no cache column left: forward() without choose()?"
        tokens = np.zeros((len(s.rows), T), dtype=np.intp)  # [B, T]: each row's token, then its drafts
        for i, row in enumerate(s.rows):
            tokens[i, : 1 + len(row.drafts)] = [row.token, *row.drafts]
            row.fed = 1 + len(row.drafts) if T > 1 else 0
        s.valid[:, start : start + T] = True  # the drafts a row does not keep are rolled back after choose()
        valid = s.valid[:, : start + T]
        mask = None if T == 1 and valid.all() else causal_mask(valid, start, T)  # padding or drafts to hide?
        positions = s.positions[:, None] + np.arange(T)
        _, s.logits = run(
            self.model, tokens, positions, mask, kv_cache=s.cache, start=start, head="last" if T == 1 else "all"
        )
        self.end += T
        self._step = (self._layouts, T)
        if T == 1:
            s.positions += 1

    def _roll_back(self, kept) -> None:  # [B]: how many of the step's T columns each row keeps (0: not in it)
        """After a step that fed drafts: each row of it keeps the first `kept` of the step's columns
        (its token and the drafts it accepted) and its position moves on by as many; the others
        become padding. If no layout moved the columns since, the columns past the longest kept run
        are free again (the next step writes there)."""
        s, (layouts, T) = self.state, self._step
        for i, k in enumerate(kept):
            if k:
                s.valid[i, self.end - T + k : self.end] = False
                s.positions[i] += k
        if layouts == self._layouts:  # no layout moved the step's columns: give the unkept ones back
            self.end -= T - int(kept.max())
        s.logits = s.logits[:, 0]  # every row has chosen: these are no longer read

    # -- layout
    def _prefill(self, rows: list[Row], *, room: int) -> _Part:
        """Run the prompts of `rows`, left-padded to the longest, into a cache of their own with
        `room` columns more."""
        model = self.model
        ids, valid, positions = left_pad([r.ids for r in rows])  # [b, L] each
        L = ids.shape[1]
        cache = new_cache(model.config, len(rows), L + room)
        x, logits = run(model, ids, positions, causal_mask(valid, 0, L), kv_cache=cache, head="last")  # [b, V]
        score_prompts(model, rows, x, ids, valid, 0)
        valid = np.concatenate([valid, np.zeros((len(rows), room), dtype=bool)], axis=1)
        return _Part(rows, cache, np.arange(len(rows)), valid, positions[:, -1] + 1, logits)

    def _used(self, indices) -> _Part:
        """The rows at `indices`, cut to the columns they use (up to `end`); views, not copies."""
        idx = np.asarray(indices, dtype=np.intp)
        s = self.state
        valid = s.valid[idx, : self.end]
        lead = int(np.argmax(valid.any(axis=0)))  # the first column any of these rows uses
        return _Part(
            [s.rows[i] for i in idx],
            s.cache[:, :, :, :, lead : self.end],
            idx,
            valid[:, lead:],
            s.positions[idx],
            s.logits[idx],
        )

    def _lay_out(self, parts: list[_Part], *, pending: bool, tight: bool = False) -> None:
        """A new cache holding every part's rows right-aligned at `end`, with room for the tokens
        the rows may still feed back; `tight` drops each row's padding columns too (those that drafts
        not kept left behind)."""
        rows = [row for p in parts for row in p.rows]
        counts = [p.valid.sum(axis=1) for p in parts] if tight else None
        width = int(max(c.max() for c in counts)) if tight else max(p.valid.shape[1] for p in parts)
        room = _room(rows, pending=pending)
        cache = new_cache(self.model.config, len(rows), width + room)
        valid = np.zeros((len(rows), width + room), dtype=bool)
        b = 0
        for n_part, p in enumerate(parts):
            n, w = len(p.rows), p.valid.shape[1]
            if tight:
                for j in range(n):  # each row's real columns, in order, right-aligned
                    cols = np.flatnonzero(p.valid[j])
                    cache[:, :, b + j, :, width - len(cols) : width] = np.take(
                        p.cache[:, :, p.cache_rows[j]], cols, axis=3
                    )
                    valid[b + j, width - len(cols) : width] = True
            else:
                copy_rows(cache[:, :, b : b + n, :, width - w : width], p.cache, p.cache_rows)
                valid[b : b + n, width - w : width] = p.valid[:, :w]
            b += n
        positions = np.concatenate([p.positions for p in parts])
        steps = max(p.logits.ndim for p in parts) == 3  # a step that fed drafts is waiting for choose()
        T = max(p.logits.shape[1] for p in parts if p.logits.ndim == 3) if steps else 0
        logits = np.concatenate(
            [p.logits if p.logits.ndim == 3 or not steps else _at_first(p.logits, T) for p in parts]
        )
        self.state = _Part(rows, cache, np.arange(len(rows)), valid, positions, logits)
        self.end = width
        self._layouts += 1


def _at_first(logits, T):  # [b, V] -> [b, T, V]
    """Logits of rows that joined after a step that fed drafts, as that step's other rows have them:
    at position 0 (the rows choose from there; the rest is not read)."""
    out = np.zeros((len(logits), T, logits.shape[1]), dtype=logits.dtype)
    out[:, 0] = logits
    return out


class _Prefill:
    """Rows whose prompts go through the model a chunk at a time: the left-padded ids, their own cache
    (as wide as the longest prompt, with room for the tokens to come should they be the whole batch
    when they join: np.zeros costs that room no memory until written), and how many columns are done."""

    def __init__(self, model, rows: list[Row]):
        self.rows = rows
        self.ids, self.valid, self.positions = left_pad([r.ids for r in rows])  # [b, L] each
        self.room = _room(rows, pending=False)  # used if these rows become the whole batch
        self.cache = new_cache(model.config, len(rows), self.ids.shape[1] + self.room)
        self.done = 0

    def run(self, model, budget: int) -> _Part | None:
        """Prefill the next columns, at most `budget` tokens over all rows (one column at least); the
        finished part once the last column is in, else None."""
        b, L = self.ids.shape
        s, e = self.done, min(L, self.done + max(1, budget // b))
        mask = causal_mask(self.valid[:, :e], s, e - s)
        head = "last" if e == L else None  # the logits once the last column is in
        x, logits = run(model, self.ids[:, s:e], self.positions[:, s:e], mask, kv_cache=self.cache, start=s, head=head)
        score_prompts(model, self.rows, x, self.ids, self.valid, s)
        self.done = e
        if e < L:
            return None
        valid = np.concatenate([self.valid, np.zeros((b, self.room), dtype=bool)], axis=1)
        return _Part(self.rows, self.cache, np.arange(b), valid, self.positions[:, -1] + 1, logits)


def score_prompts(model, rows: Sequence[Row], x, ids, valid, s: int) -> None:  # x [b, e - s, C] of columns s..e
    """The rows that score their prompts get the log-probs of the prompt tokens that columns s..e
    predict (column c predicts the token at c + 1; padding and the last column predict none). A row
    that only scores is finished once its last column is in."""
    e, L = s + x.shape[1], ids.shape[1]
    for r, row in enumerate(rows):
        if row.prompt_logprobs is None:
            continue
        cols = np.arange(s, min(e, L - 1))
        cols = cols[valid[r, cols]]
        if len(cols):
            row._prompt_parts.append(
                scoring.model_log_probs(model, x[r, cols - s], ids[r, cols + 1], top=row.prompt_logprobs)
            )
        if e == L:
            row.prompt_scored = True
            if row.score_only:
                row.finish()


def prompt_lookup(row: Row, position: int, n_ctx: int) -> list[int]:
    """Prompt-lookup drafts for the row's next step (Saxena, 2023; transformers' names): the tokens
    that followed the most recent earlier occurrence of the row's last n tokens in its prompt and
    text so far, n from `max_matching_ngram_size` down to 1, at most `prompt_lookup_num_tokens`, and
    no more than the row may still produce after the next token or its context holds."""
    k = row.options.prompt_lookup_num_tokens
    if k is None:
        return []
    k = min(k, row.options.max_new_tokens - row.n_new - 1, n_ctx - 1 - position)
    if k < 1:
        return []
    history = row.history()  # ends with the token fed next
    for n in range(min(row.options.max_matching_ngram_size, len(history) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)  # every earlier n-gram
        found = np.flatnonzero((windows == history[-n:]).all(axis=1))
        if len(found):
            begin = found[-1] + n  # the most recent occurrence's continuation
            return history[begin : begin + k].tolist()
    return []


def _room(rows: Sequence[Row], *, pending: bool) -> int:
    """Cache columns the rows may still need: a row that has chosen n_new of its max_new_tokens
    chooses the rest, and feeds back all but the last; with `pending`, its last chosen token is
    still to be fed too."""
    return max(r.options.max_new_tokens - r.n_new - (0 if pending else 1) for r in rows)
