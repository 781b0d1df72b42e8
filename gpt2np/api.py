"""The public `GPT2` class: a checkpoint loaded and ready to score and generate.

    model = GPT2.from_pretrained("gpt2")          # a hub name, or a checkpoint folder
    logits = model(ids)                           # [T] -> [T, V]
    text = model.generate("Hello", seed=0)        # str -> str, list -> list

The math is gpt2np.model's (its textbook twin: gpt2np.reference); decoding and scoring run on
gpt2np.engine; options are gpt2np.sampling's `GenerationOptions`.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from . import engine, runner, scoring
from .checkpoint import CONFIG_NAME, check_tokenizer, load_state_dict, random_state_dict, unflatten
from .config import GPT2Config
from .generation import Completion, check_prompts, complete, generate_ids, generate_text, prepare_prompts, stream_text
from .locate import checkpoint_folder
from .sampling import LogitAdjustments, check_logprobs, generation_arguments, row_generators
from .threads import Threads, min_positions, resolve_threads
from .tokenizer import Tokenizer


class ScoredText(NamedTuple):
    """`GPT2.score`'s answer: the text's ids, and for each token after the first its log-probability
    and the `top` most likely tokens at its position with theirs (natural logs)."""

    ids: list[int]
    log_probs: np.ndarray  # [n - 1] float64
    top_ids: np.ndarray  # [n - 1, top]
    top_log_probs: np.ndarray  # [n - 1, top] float64


class GPT2:
    """A GPT-2 checkpoint ready to run: `model(ids)` gives logits, `model.generate(...)` text.

    Load one with `GPT2.from_pretrained("gpt2")` (a hub name, downloaded once into the hub's cache)
    or `GPT2.from_pretrained("path/to/folder")` (a folder with config.json + model.safetensors).
    """

    def __init__(self, config, params, tokenizer=None, *, name=None, threads=None):
        self.config = config
        self.params = params  # nested dict of float32 arrays, keyed by the checkpoint's names
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        self.name = name
        # The threads of long forward passes (gpt2np.threads): `threads` if given, else
        # $GPT2NP_NUM_THREADS, else every core this process may use. threads=1 runs serially.
        self.threads = Threads(threads, min_positions=min_positions(config.n_embd))

    @classmethod
    def from_pretrained(
        cls, name_or_path, *, revision="main", cache_dir=None, token=None, offline=None, progress=True, threads=None
    ) -> "GPT2":
        """Load a checkpoint folder, or a hub repo (`gpt2`, `openai-community/gpt2-medium`, ...).

        A folder is used as it is. `tiny` is the small model that ships inside the package (no
        network). Otherwise the name is a hub repo id (short names `gpt2`, `gpt2-medium`,
        `gpt2-large`, `gpt2-xl`, `distilgpt2` are mapped to their repos), fetched into the
        HuggingFace cache unless already there. The rule, stated once: `gpt2np.locate`.
        `threads`: how many threads a long forward pass (a prompt, scoring) uses; None takes
        $GPT2NP_NUM_THREADS or else every core the process may use, 1 runs serially.
        """
        threads = resolve_threads(threads)  # a bad value fails before any download
        folder = checkpoint_folder(
            name_or_path, revision=revision, cache_dir=cache_dir, token=token, offline=offline, progress=progress
        )
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(
                f"no {CONFIG_NAME} in {folder}: a checkpoint folder holds config.json and model.safetensors"
            )
        config = GPT2Config.from_json_file(folder / CONFIG_NAME)
        params = unflatten(load_state_dict(folder, config, column_major=runner.COLUMN_MAJOR))
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        tokenizer = Tokenizer.from_files(vocab, merges) if vocab.is_file() and merges.is_file() else Tokenizer()
        check_tokenizer(config, tokenizer)  # a mismatch fails here, not in the middle of a generation
        return cls(config, params, tokenizer, name=str(name_or_path), threads=threads)

    @classmethod
    def from_random(cls, config, *, seed=0, std=0.02, threads=None) -> "GPT2":
        """A randomly initialised model of the given config (for tests and benchmarks)."""
        state = random_state_dict(config, seed=seed, std=std)
        state = {k: np.asfortranarray(v) if k in runner.COLUMN_MAJOR else v for k, v in state.items()}
        return cls(config, unflatten(state), name="random", threads=threads)

    @property
    def lm_head_weight(self):  # [V, C]
        return self.params["wte"]["weight"] if self.config.tie_word_embeddings else self.params["lm_head"]["weight"]

    def check_ids(self, ids) -> np.ndarray:
        """Token ids as an int array [T] or [B, T], or a ValueError that says what is wrong."""
        given = ids
        try:
            ids = np.asarray(ids)
        except ValueError as e:  # ragged nested lists
            raise ValueError(
                f"ids must be a rectangular [T] or [B, T] array of token ids ({e}); pad ragged rows or use generate_ids"
            ) from None
        check_integer_ids(given, ids, what="ids")
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0 or ids.size == 0:
            raise ValueError(f"ids must have shape [T] or [B, T] with T >= 1, got shape {ids.shape}")
        if ids.shape[-1] > self.config.n_ctx:
            raise ValueError(
                f"sequence of {ids.shape[-1]} tokens is longer than the context ({self.config.n_ctx} tokens)"
            )
        V = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            bad = ids[(ids < 0) | (ids >= V)]
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {V})")
        return ids.astype(np.intp, copy=False)

    def __call__(self, ids) -> np.ndarray:  # [T] -> [T, V]  or  [B, T] -> [B, T, V]
        """Logits for every position of `ids` (float32)."""
        ids = self.check_ids(ids)
        logits = engine.logits(self, ids if ids.ndim == 2 else ids[None])  # [B, T, V]
        return logits if ids.ndim == 2 else logits[0]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"GPT2({self.name!r}, n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, n_ctx={c.n_ctx}, "
            f"threads={self.threads.n})"
        )

    # ------------------------------------------------------------------ generation
    # The options of generate, generate_ids and stream are keyword arguments read by one function,
    # gpt2np.sampling.generation_arguments: GenerationOptions' fields (whose defaults are written there
    # alone), seed and, for text, return_full_text. So the three cannot drift apart.
    def generate(self, prompt_or_prompts, **options):
        """Continue a prompt (str -> str) or several (list -> list, same order).

        The defaults are GenerationOptions': the GPT-2 model card endpoint's (sampling, temperature 0.8).
        `top_k` is off unless given (transformers silently uses 50 when sampling).
        `do_sample=False` is greedy and ignores temperature / top_k / top_p. A row ends at EOS,
        after `max_new_tokens`, or at the first of the `stop` strings (cut from the text).
        `return_full_text=True` returns the prompt verbatim followed by the continuation.
        `seed` makes the call reproducible; row i of a batch draws from the seed's i-th child, so
        a prompt gives the same text alone or in a batch. An empty prompt is conditioned on
        <|endoftext|>. An unknown option is a TypeError that lists the known ones.
        """
        prompts, single = check_prompts(prompt_or_prompts)
        options, seed, return_full_text = generation_arguments(options, method="generate")
        rngs = row_generators(seed, len(prompts))
        texts = generate_text(self, prompts, options, rngs, return_full_text=return_full_text)
        return texts[0] if single else texts

    def generate_ids(self, prompts, **options) -> list[list[int]]:
        """Like `generate`, on token ids: a list of id lists in, the new ids of each out (EOS not included;
        with `stop`, up to and including the token that completed the stop string). The same options,
        but for return_full_text."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError("generate_ids takes a non-empty list of token-id lists, e.g. [[464, 3290]]")
        if all(isinstance(p, numbers.Integral) for p in prompts):
            raise TypeError("generate_ids takes a list of token-id lists: wrap a single prompt as [ids]")
        prompts = [_prompt_ids(p, i) for i, p in enumerate(prompts)]
        options, seed, _ = generation_arguments(options, method="generate_ids", text=False)
        return generate_ids(self, prompts, options, row_generators(seed, len(prompts)))

    def stream(self, prompt, **options):
        """Yield the text of `generate(prompt, ...)` in pieces as it is decided (same options).
        A character split across tokens is held back until complete; so is text that a stop string
        could still remove. The pieces join to exactly what `generate` returns for the same seed."""
        if not isinstance(prompt, str):
            raise TypeError(f"stream takes one prompt string, got {type(prompt).__name__}")
        options, seed, return_full_text = generation_arguments(options, method="stream")
        return stream_text(self, prompt, options, row_generators(seed, 1)[0], return_full_text=return_full_text)

    def complete(
        self,
        prompt_or_prompts,
        *,
        logprobs=None,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        logit_bias=None,
        **options,
    ) -> Completion | list[Completion]:
        """Like `generate`, but each prompt gives a `Completion`: its ids, the continuation's text, why it
        ended, and with `logprobs=k` (0 to 5) the log-probability of every new token and of the k most
        likely tokens at its step. Log-probs are the model's own, before temperature, top-k, top-p,
        penalties and bias (what `score` gives for the same text). OpenAI's `presence_penalty`,
        `frequency_penalty` (in [-2, 2], over the tokens generated) and `logit_bias` ({token id: bias in
        [-100, 100]}) are taken too. The other options are generate_ids'."""
        prompts, single = check_prompts(prompt_or_prompts)
        options, seed, _ = generation_arguments(options, method="complete", text=False)
        bias = tuple((logit_bias or {}).items())
        adjust = LogitAdjustments(presence_penalty, frequency_penalty, bias)
        ids = prepare_prompts(self.tokenizer, prompts, bos=self.config.bos_token_id)
        done = complete(
            self, ids, options, row_generators(seed, len(prompts)), adjust, logprobs=check_logprobs(logprobs)
        )
        return done[0] if single else done

    def score(self, text, *, top=0) -> ScoredText:
        """The log-probability of every token of `text` (a string, or a list of token ids) after the
        first, each given the tokens before it, and with `top=k` (0 to 5) the k most likely tokens at
        each position (a `ScoredText`). One pass; gpt2np.scoring's formula (a float64-accumulated
        log-softmax), the one behind evaluation, batch scoring and echo. The first token has nothing
        before it and is not scored."""
        ids = self.tokenizer.encode(text, allowed_special="all") if isinstance(text, str) else _prompt_ids(text, 0)
        if len(ids) < 1:
            raise ValueError("nothing to score: the text is empty")
        scored = scoring.score_ids(self, ids, top=check_logprobs(top, name="top"))
        return ScoredText(ids, scored.log_probs, scored.top_ids, scored.top_log_probs)

    def hidden_states(self, ids) -> np.ndarray:  # [T] -> [T, C]  or  [B, T] -> [B, T, C]
        """The trunk's output for every position of `ids` (after the final layer norm, before the LM
        head), float32: what `model(ids)` multiplies by the token embedding."""
        ids = self.check_ids(ids)
        x = engine.hidden_states(self, ids if ids.ndim == 2 else ids[None])
        return x if ids.ndim == 2 else x[0]


def check_integer_ids(ids, array: np.ndarray, *, what: str) -> None:
    """The rule for token ids a caller gives (`model(ids)`, `generate_ids`), `array` being np.asarray(ids):
    integers. Booleans and floats are refused even when they hold whole numbers (True, 1.0), rather
    than read as ids: in the array's dtype, and in a list, where NumPy turns [5, True] into [5, 1]."""
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(f"{what} must be integer token ids, got dtype {array.dtype}")
    if not isinstance(ids, np.ndarray):
        flag = next((x for x in np.asarray(ids, dtype=object).ravel() if isinstance(x, (bool, np.bool_))), None)
        if flag is not None:
            raise ValueError(f"{what} must be integer token ids, got {flag!r}")


def _prompt_ids(prompt, i: int) -> list[int]:
    """Prompt i of generate_ids as a list of ints, checked by the rule of `check_integer_ids`."""
    if not isinstance(prompt, (list, tuple, np.ndarray)) or len(prompt) == 0:
        raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {prompt!r}")
    try:
        array = np.asarray(prompt)
    except ValueError:  # ragged nested lists
        array = np.asarray(prompt, dtype=object)
    check_integer_ids(prompt, array, what=f"prompt {i}")
    if array.ndim != 1:
        raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {array.shape}")
    return array.tolist()
