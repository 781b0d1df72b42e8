"""Generation: greedy parity with transformers, the KV cache, ragged batches, the sampler's
semantics against transformers' warpers, stop strings, EOS, streaming and argument errors."""

import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2np import GPT2, GPT2Config, Tokenizer
from gpt2np.engine import Engine, Row
from gpt2np.generation import RowText
from gpt2np.sampling import (
    GenerationOptions,
    apply_repetition_penalty,
    apply_temperature,
    draw,
    next_token,
    row_generators,
    top_k_keep,
    top_p_keep,
    warp,
)


def decode(model, prompts, options, rngs):
    """The engine over rows with options of their own: yields, after each choice, the engine, and
    {prompt index: token} for the rows that produced one (before the step that feeds them)."""
    rows = [Row(p, o, r, model.config.vocab_size) for p, o, r in zip(prompts, options, rngs)]
    engine = Engine(model)
    engine.add(rows)
    while engine.rows:
        yield engine, {rows.index(row): token for row, token in engine.choose()}
        engine.forward()


PROMPTS = ["I believe the meaning of life is", "Hello", "The quick brown fox jumps over the lazy dog because it"]


@pytest.fixture(scope="module")
def small():
    """A small random model with the real vocabulary (so text round-trips)."""
    return GPT2.from_random(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=128), seed=1, std=0.1)


# ------------------------------------------------------------------------------- parity with transformers
def test_greedy_ids_match_transformers(gpt2_pair):
    """Greedy ids equal transformers' generate(do_sample=False), each prompt alone in transformers,
    all prompts as one ragged (left-padded) batch in gpt2np."""
    import torch

    ours, hf = gpt2_pair
    tok = ours.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    batch = ours.generate_ids(prompts, max_new_tokens=40, do_sample=False, ignore_eos=True)
    for prompt, got in zip(prompts, batch):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=40,
                do_sample=False,
                pad_token_id=50256,
                eos_token_id=None,
            )
        expected = out[0, len(prompt) :].tolist()
        assert got == expected, (
            f"first difference at {next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)}"
        )
        assert ours.generate_ids([prompt], max_new_tokens=40, do_sample=False, ignore_eos=True)[0] == got


def test_sampling_warpers_match_transformers():
    """For fixed logits, the tokens that may be drawn are exactly those transformers' warpers keep."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(0)
    V = 50257
    cases = []
    for _ in range(3):
        cases.append(rng.standard_normal(V).astype(np.float32) * 3)
    peaked = rng.standard_normal(V).astype(np.float32)
    peaked[123] = 30.0
    cases.append(peaked)
    ties = np.zeros(V, np.float32)
    ties[:10] = 5.0  # ten tied favourites
    cases.append(ties)
    settings = [
        (1.0, None, 0.9),
        (0.7, None, 0.5),
        (1.3, 50, 0.95),
        (1.0, 10, 1.0),
        (0.8, V + 5, 1.0),
        (1.0, None, 1e-9),
        (1.0, 3, 0.999),
        (2.0, None, 0.3),
    ]
    for c, logits in enumerate(cases):
        for temperature, top_k, top_p in settings:
            scores = torch.tensor(logits.copy())[None]
            scores = TemperatureLogitsWarper(temperature)(None, scores)
            if top_k is not None:
                scores = TopKLogitsWarper(top_k)(None, scores)
            if top_p < 1.0:
                scores = TopPLogitsWarper(top_p)(None, scores)
            expected = torch.isfinite(scores[0]).numpy()
            keep = warp(logits.copy(), GenerationOptions(temperature=temperature, top_k=top_k, top_p=top_p))
            keep = np.ones(V, bool) if keep is None else keep
            differ = np.flatnonzero(keep != expected)
            if differ.size:
                # Two legitimate sources of difference, both at the top_p boundary only:
                # - among logits tied with the last kept one, transformers keeps an arbitrary subset
                #   (torch's unstable sort); gpt2np keeps the lowest ids. Both keep as many.
                # - transformers sums probabilities in float32 (gpt2np accumulates them in float64); on a flat
                #   distribution with a nucleus of thousands of tokens, that moves the cut by a
                #   few tokens whose preceding mass is within float32 rounding of top_p.
                z = logits.astype(np.float64) / temperature
                probs = np.exp(z - z.max())
                probs /= probs.sum()
                before = np.empty(V)
                order = np.lexsort((np.arange(V), -z))
                before[order] = np.cumsum(probs[order]) - probs[order]  # mass of the tokens ahead
                tied = np.isin(logits[differ], logits[expected].min())
                near = np.abs(before[differ] - top_p) < 1e-4
                assert (tied | near).all(), (temperature, top_k, top_p, differ[:5])
                assert abs(int(keep.sum()) - int(expected.sum())) <= max(3, int(tied.sum())), (
                    temperature,
                    top_k,
                    top_p,
                )
            if top_p == 1.0 or c == 3:  # no nucleus boundary, or a peaked one: nothing may differ
                assert differ.size == 0, (c, temperature, top_k, top_p)


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    logits = rng.standard_normal(1000).astype(np.float32)
    history = rng.integers(0, 1000, size=30)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(history)[None], torch.tensor(logits.copy())[None])[0]
    seen = np.zeros(1000, bool)
    seen[history] = True
    from gpt2np.sampling import apply_repetition_penalty

    np.testing.assert_allclose(apply_repetition_penalty(logits.copy(), seen, 1.3), expected.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------- sampler without references
def test_top_p_edge_cases():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert top_p_keep(logits, 0.5).tolist() == [True, False, False, False]  # reaches 0.5 exactly at the first
    assert top_p_keep(logits, 0.51).tolist() == [True, True, False, False]  # the crossing token is kept
    assert top_p_keep(logits, 1e-9).tolist() == [True, False, False, False]  # at least one token
    assert top_p_keep(logits, 0.96).tolist() == [True, True, True, True]
    big = np.random.default_rng(0).standard_normal(50257).astype(np.float32)  # nucleus far beyond 256
    probs = np.exp(big - big.max()) / np.exp(big - big.max()).sum()
    order = np.argsort(-probs, kind="stable")
    n = int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1
    assert top_p_keep(big, 0.9).sum() == n


def test_top_k_edge_cases():
    logits = np.array([1, 3, 3, 2, 0], np.float32)
    assert top_k_keep(logits, 1).tolist() == [False, True, True, False, False]  # ties with the k-th stay
    assert top_k_keep(logits, 3).tolist() == [False, True, True, True, False]
    assert top_k_keep(logits, 99).all()


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, None, 1.0), (0.5, None, 1.0), (1.0, 3, 1.0), (1.0, None, 0.7), (2.0, 4, 0.9)]
)
def test_draw_frequencies_match_the_warped_distribution(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
    options = GenerationOptions(temperature=temperature, top_k=top_k, top_p=top_p)
    keep = warp(logits.copy(), options)
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max()) * (1 if keep is None else keep)
    p /= p.sum()
    n = 20_000
    rng = np.random.default_rng(123)
    counts = np.bincount([next_token(logits.copy(), options, rng) for _ in range(n)], minlength=8)
    assert (counts[p == 0] == 0).all(), "a filtered token was drawn"
    # Each count within 5 standard deviations of its binomial expectation.
    sd = np.sqrt(n * p * (1 - p)) + 1e-9
    assert (np.abs(counts - n * p) <= 5 * sd + 1).all(), (counts, n * p)


class FixedUniforms:
    """Stands in for a Generator: `random()` returns the given numbers in turn."""

    def __init__(self, values):
        self.values = iter(values)

    def random(self):
        return next(self.values)


@pytest.mark.parametrize("n", [1, 7, 1024, 1025, 3000, 50257])
def test_draw_is_the_inverse_cdf_of_the_softmax(n):
    """`draw` walks the CDF in blocks; it must pick exactly the token the whole float64 CDF of the
    same weights picks, for uniform numbers anywhere in [0, 1), the ends included, and never a
    token of weight 0 (logits of -inf, or exp underflowing to 0)."""
    rng = np.random.default_rng(n)
    z = (rng.standard_normal(n) * 4).astype(np.float32)
    z[rng.random(n) < 0.3] = -np.inf  # filtered tokens
    z[rng.random(n) < 0.05] = -200.0  # exp underflows to 0 in float32
    z[n // 2] = 3.0  # at least one token that can be drawn
    if n > 10:
        z[-5:] = -np.inf  # nothing drawable at the very end
    uniforms = [0.0, np.nextafter(1.0, 0.0), 0.5, *rng.random(2000)]
    w = z - z.max()
    np.exp(w, out=w)
    cdf = np.cumsum(w.astype(np.float64))
    drawable = np.flatnonzero(w > 0)
    expected = [min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), int(drawable[-1])) for u in uniforms]
    got = [draw(z, FixedUniforms([u])) for u in uniforms]
    assert got == expected
    assert all(w[i] > 0 for i in got)


# ------------------------------------------------------------------------------- options at float32's edge
@pytest.fixture()
def no_warnings():
    """Any NumPy warning (overflow, divide by zero, invalid value) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-38])
def test_a_temperature_near_zero_is_greedy(small, temperature, no_warnings):
    """logits / 1e-300 overflows float32 (it once gave an empty continuation and RuntimeWarnings); the
    limit of temperature -> 0 is the most likely token."""
    ids = small.tokenizer.encode(PROMPTS[0])
    greedy = small.generate_ids([ids], do_sample=False, max_new_tokens=10, ignore_eos=True)
    assert small.generate_ids([ids], temperature=temperature, seed=0, max_new_tokens=10, ignore_eos=True) == greedy
    text = small.generate(PROMPTS[0], temperature=temperature, seed=0, max_new_tokens=5, return_full_text=False)
    assert text == small.tokenizer.decode(greedy[0][:5]) and text


def test_a_temperature_near_zero_draws_among_the_tokens_tied_at_the_top(no_warnings):
    logits = np.array([1.0, 3.0, 2.0, 3.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    for temperature in (1e-300, 1e-40):
        options = GenerationOptions(temperature=temperature, top_k=3, top_p=0.99)
        assert {next_token(logits.copy(), options, rng) for _ in range(100)} == {1, 3}


def test_a_huge_temperature_is_uniform(no_warnings):
    logits = np.array([1.0, 3.0, 2.0, 3.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    counts = np.bincount([next_token(logits.copy(), GenerationOptions(temperature=1e300), rng) for _ in range(2000)])
    assert (np.abs(counts - 400) < 100).all(), counts


def test_ordinary_temperatures_divide_in_float32_as_transformers_does():
    logits = (np.random.default_rng(0).standard_normal(50257) * 5).astype(np.float32)
    for temperature in (1e-3, 0.7, 1.0, 2.5, 100.0):
        expected = logits / np.float32(temperature)
        assert np.array_equal(apply_temperature(logits.copy(), temperature), expected)


def test_a_repetition_penalty_near_zero_or_huge_in_the_limit(no_warnings):
    """A seen positive logit divided by ~0 outweighs every other token (the largest such one wins); a
    seen negative one multiplied by a huge penalty can never be drawn. Once an IndexError."""
    logits = np.array([10.0, 3.0, 2.0, -1.0, 5.0], np.float32)
    seen = np.array([False, True, True, True, False])
    for penalty in (1e-300, 5e-324, 1e-40):
        penalized = apply_repetition_penalty(logits.copy(), seen, penalty)
        assert penalized[1] == 0 and np.isneginf(penalized[[0, 2, 3, 4]]).all(), (penalty, penalized)
        options, rng = GenerationOptions(repetition_penalty=penalty), np.random.default_rng(0)
        assert {next_token(logits.copy(), options, rng, seen) for _ in range(50)} == {1}
    assert apply_repetition_penalty(logits.copy(), seen, 1e300).tolist() == [0, -10, -10, -np.inf, -5]


def test_a_repetition_penalty_near_zero_when_sampling(small, no_warnings):
    """Sampling then agrees with greedy: only the most likely token already seen can be drawn."""
    ids = small.tokenizer.encode(PROMPTS[0])
    for penalty in (1e-300, 5e-324):
        kwargs = dict(max_new_tokens=8, ignore_eos=True, repetition_penalty=penalty)
        greedy = small.generate_ids([ids], do_sample=False, **kwargs)
        assert small.generate_ids([ids], seed=3, **kwargs) == greedy
        assert set(greedy[0]) <= set(ids)


def test_greedy_ignores_sampling_knobs(small):
    a = small.generate_ids([[1, 2, 3]], do_sample=False, max_new_tokens=8, temperature=0.01, top_k=1, top_p=0.1)
    b = small.generate_ids([[1, 2, 3]], do_sample=False, max_new_tokens=8)
    assert a == b


# ------------------------------------------------------------------------------- the decoding loop
def test_cached_decoding_equals_full_forward_every_step(small):
    """The logits each token was chosen from equal a full forward pass over prompt + output so far."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300, 301], [1000, 2000, 3000, 4000]]
    options = [GenerationOptions(do_sample=False, max_new_tokens=12, ignore_eos=True)] * 3
    seqs = [list(p) for p in prompts]
    for engine, step in decode(small, prompts, options, row_generators(0, 3)):
        for i, live in enumerate(engine.rows):
            row = prompts.index(live.ids)  # the prompts differ: each names its row
            full = small(np.array(seqs[row]))[-1]
            error = np.abs(engine.logits[i] - full).max() / np.abs(full).max()
            assert error <= 1e-5, f"row {row} at length {len(seqs[row])}: {error:.2e}"
        for row, token in step.items():
            seqs[row].append(token)
    assert all(len(s) == len(p) + 12 for s, p in zip(seqs, prompts))


def test_ragged_batch_rows_equal_rows_alone(small):
    """Left padding, per-row positions and rows finishing at different times change nothing."""
    prompts = [[5] * 9, [17, 18], [400, 500, 600, 700], [9999]]
    options = [GenerationOptions(do_sample=False, max_new_tokens=n, ignore_eos=True) for n in (3, 15, 7, 11)]
    outs = [[] for _ in prompts]
    for _, step in decode(small, prompts, options, row_generators(0, 4)):
        for row, token in step.items():
            outs[row].append(token)
    for p, o, got in zip(prompts, options, outs):
        alone = [[]]
        for _, step in decode(small, [p], [o], row_generators(0, 1)):
            alone[0].append(step[0])
        assert got == alone[0] and len(got) == o.max_new_tokens


def test_seed_reproducible_and_independent_of_batch(small):
    a = small.generate(PROMPTS, max_new_tokens=12, seed=7)
    assert small.generate(PROMPTS, max_new_tokens=12, seed=7) == a
    assert small.generate(PROMPTS[0], max_new_tokens=12, seed=7) == a[0]
    assert small.generate(PROMPTS, max_new_tokens=12, seed=8) != a
    samples = small.generate([PROMPTS[1]] * 4, max_new_tokens=12, seed=7)
    assert len(set(samples)) > 1, "rows of one call draw different samples"


def test_sampled_sampling_matches_single_row_in_ragged_batch(small):
    batch = small.generate_ids(
        [[1, 2, 3, 4, 5], [6]],
        max_new_tokens=10,
        seed=3,
        top_p=0.9,
        top_k=40,
        temperature=1.2,
        repetition_penalty=1.2,
        ignore_eos=True,
    )
    alone = small.generate_ids(
        [[1, 2, 3, 4, 5]],
        max_new_tokens=10,
        seed=3,
        top_p=0.9,
        top_k=40,
        temperature=1.2,
        repetition_penalty=1.2,
        ignore_eos=True,
    )
    assert batch[0] == alone[0]


@pytest.fixture()
def eos_model():
    """A model whose every prediction is <|endoftext|>: ln_f's output is a constant vector b, and
    b points along wte[50256]."""
    model = GPT2.from_random(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_ctx=64), seed=0)
    b = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    model.params["ln_f"]["weight"][:] = 0
    model.params["ln_f"]["bias"][:] = b
    model.params["wte"]["weight"][50256] = 10 * b
    return model


def test_eos_ends_a_row_and_is_not_returned(eos_model):
    assert eos_model.generate_ids([[1, 2]], max_new_tokens=5, do_sample=False) == [[]]
    assert eos_model.generate("Hi", max_new_tokens=5, do_sample=False) == "Hi"
    assert eos_model.generate("Hi", max_new_tokens=5, do_sample=False, return_full_text=False) == ""
    assert eos_model.generate_ids([[1, 2]], max_new_tokens=3, do_sample=False, ignore_eos=True) == [[50256] * 3]


def test_return_full_text_keeps_the_prompt_verbatim(small):
    prompt = "  odd  spacing\t and <|endoftext|> text "
    full = small.generate(prompt, max_new_tokens=6, seed=1)
    tail = small.generate(prompt, max_new_tokens=6, seed=1, return_full_text=False)
    assert full == prompt + tail and tail


def test_stop_strings_cut_the_text(small):
    text = small.generate("The", max_new_tokens=30, do_sample=False, return_full_text=False, ignore_eos=True)
    stop = text[10:13]
    first = text.find(stop)
    cut = small.generate(
        "The", max_new_tokens=30, do_sample=False, return_full_text=False, ignore_eos=True, stop=[stop, "\u2603never"]
    )
    assert cut == text[:first]
    ids = small.generate_ids(
        [small.tokenizer.encode("The")], max_new_tokens=30, do_sample=False, ignore_eos=True, stop=stop
    )
    assert stop in small.tokenizer.decode(ids[0]) and stop not in small.tokenizer.decode(ids[0][:-1])


def test_empty_prompt_is_conditioned_on_endoftext(small):
    assert small.generate("", max_new_tokens=5, do_sample=False) == small.tokenizer.decode(
        small.generate_ids([[50256]], max_new_tokens=5, do_sample=False)[0]
    )


# ------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("seed", range(6))
def test_stream_joins_to_generate(small, seed):
    kwargs = dict(max_new_tokens=25, seed=seed, temperature=1.5, stop=["e "] if seed % 2 else None)
    pieces = list(small.stream(PROMPTS[0], **kwargs))
    assert "".join(pieces) == small.generate(PROMPTS[0], **kwargs)
    assert "".join(small.stream(PROMPTS[0], return_full_text=False, **kwargs)) == small.generate(
        PROMPTS[0], return_full_text=False, **kwargs
    )


_TOKENIZER = Tokenizer()
_SPLIT = _TOKENIZER.encode("日本語 👨‍👩‍👧 🇺🇸 é ok")  # many of these tokens are parts of a character


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(_SPLIT + [0, 220, 31373, 447, 246, 171]), max_size=30),
    st.lists(st.sampled_from(["ok", "日", " ", "👧"]), max_size=2),
)
def test_row_text_pieces_never_split_a_character(ids, stop):
    """Pieces join to the decoded text cut at the first stop string; no piece ends mid-character."""
    text = RowText(_TOKENIZER, tuple(stop))
    pieces = []
    for token in ids:
        stopped = text.add(token)
        pieces.append(text.take())
        if stopped:
            break
    text.close()
    pieces.append(text.take())
    full = _TOKENIZER.decode(ids)
    hits = [full.find(s) for s in stop if s in full]
    assert "".join(pieces) == (full[: min(hits)] if hits else full)
    if "\ufffd" not in full:
        assert all("\ufffd" not in p for p in pieces)


def test_stream_holds_back_split_characters(small):
    """A row whose tokens split an emoji yields the emoji whole."""
    text = RowText(small.tokenizer)
    got = []
    for token in small.tokenizer.encode("👨‍👩‍👧"):
        text.add(token)
        got.append(text.take())
    assert "".join(got) == "👨‍👩‍👧" and all("\ufffd" not in g for g in got)


# ------------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(temperature=0), ValueError, "turn do_sample off"),
        (dict(temperature=-1), ValueError, "temperature"),
        (dict(top_p=0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=0), ValueError, "top_k must be >= 1"),
        (dict(top_k=2.5), TypeError, "top_k must be an integer"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
        (dict(repetition_penalty=0), ValueError, "repetition_penalty"),
        (dict(temperature="hot"), TypeError, "temperature must be a number"),
        (dict(do_sample="yes"), TypeError, "do_sample"),
        (dict(stop=[""]), TypeError, "stop"),
        (dict(stop=5), TypeError, "stop"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(return_full_text=None), TypeError, "return_full_text"),
        (
            dict(max_new_tokens=200),
            ValueError,
            r"prompt is 1 token and max_new_tokens is 200, more than the model's 128-token",
        ),
    ],
)
def test_bad_arguments(small, kwargs, error, message):
    with pytest.raises(error, match=message):
        small.generate("Hi", **kwargs)


@pytest.mark.parametrize("call", ["generate", "generate_ids", "stream"])
def test_an_unknown_option_is_a_type_error_naming_the_known_ones(small, call):
    prompt = [[1, 2]] if call == "generate_ids" else "Hi"
    message = rf"{call}\(\) got an unexpected keyword argument 'max_tokens'; its options are max_new_tokens, do_sample"
    with pytest.raises(TypeError, match=message):
        getattr(small, call)(prompt, max_tokens=3)


def test_the_entry_points_take_their_defaults_from_generation_options(small):
    """generate, generate_ids and stream have no defaults of their own: omitted options are GenerationOptions'."""
    from dataclasses import asdict

    explicit = asdict(GenerationOptions())
    assert small.generate("Hi", seed=4) == small.generate("Hi", seed=4, **explicit)
    assert "".join(small.stream("Hi", seed=4)) == small.generate("Hi", seed=4)
    ids = small.tokenizer.encode("Hi")
    assert small.generate_ids([ids], seed=4) == small.generate_ids([ids], seed=4, **explicit)
    assert len(small.generate_ids([ids], seed=4, ignore_eos=True)[0]) == GenerationOptions().max_new_tokens


def test_bad_prompts(small):
    with pytest.raises(ValueError, match="empty"):
        small.generate([])
    with pytest.raises(TypeError, match="prompt 1 is int"):
        small.generate(["a", 3])
    with pytest.raises(TypeError, match="string or a list"):
        small.generate(42)
    with pytest.raises(TypeError, match=r"wrap a single prompt"):
        small.generate_ids([1, 2, 3])
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty"):
        small.generate_ids([[]])
    with pytest.raises(ValueError, match="token ids must be in"):
        small.generate_ids([[60000]])
    with pytest.raises(TypeError, match="one prompt string"):
        small.stream(["a"])


NOT_IDS = [  # (a prompt that is not token ids, what the message says it is)
    ([1.7], "dtype float64"),
    ([True], "dtype bool"),
    (["a"], "dtype <U1"),
    ([5, 2.0], "dtype float64"),
    ([5, True], "True"),
    ([5, "a"], "dtype <U21"),
    (np.array([5.0]), "dtype float64"),
]


@pytest.mark.parametrize("prompt, shown", NOT_IDS)
def test_generate_ids_takes_integer_ids_by_the_rule_of_model(small, prompt, shown):
    """[[1.7]] and [[True]] were read as id 1, and [["a"]] leaked int()'s message; model() refuses them all."""
    with pytest.raises(ValueError, match=rf"^prompt 1 must be integer token ids, got {re.escape(shown)}$"):
        small.generate_ids([[5, 6], prompt], max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"^ids must be integer token ids, got {re.escape(shown)}$"):
        small(prompt)
    with pytest.raises(ValueError, match="prompt 0 must be a flat list of token ids"):
        small.generate_ids([[[5, 6]]], max_new_tokens=2)
    ids = [np.array([5, 6]), (np.int32(5), np.int64(6)), [5, 6]]
    assert len(set(map(tuple, small.generate_ids(ids, max_new_tokens=3, do_sample=False)))) == 1


def test_temperature_zero_is_fine_when_greedy(small):
    assert small.generate("Hi", do_sample=False, temperature=0, max_new_tokens=3)


def test_row_sampler_counts_marks_seen_and_ends():
    """RowSampler: one next_token per call, counted and marked seen; EOS ends the row uncounted."""
    from gpt2np.sampling import RowSampler

    V, eos = 20, 19
    options = GenerationOptions(max_new_tokens=3, temperature=0.9, repetition_penalty=1.3)
    sampler, rng = RowSampler([1, 2], options, np.random.default_rng(5), V), np.random.default_rng(5)
    seen = np.zeros(V, dtype=bool)
    seen[[1, 2]] = True
    logits = np.random.default_rng(0).standard_normal((3, V)).astype(np.float32)
    logits[:, eos] = -1e9
    for i in range(3):
        assert not sampler.done
        expected = next_token(logits[i].copy(), options, rng, seen)
        seen[expected] = True
        assert sampler.choose(logits[i].copy(), eos) == expected
        assert sampler.n_new == i + 1 and (sampler.seen == seen).all()
    assert sampler.done

    ends = RowSampler([1], GenerationOptions(do_sample=False, max_new_tokens=5), None, V)
    assert ends.seen is None  # no repetition penalty: nothing to track
    only_eos = np.full(V, -1e9, dtype=np.float32)
    only_eos[eos] = 0
    assert ends.choose(only_eos.copy(), eos) is None and ends.done and ends.n_new == 0
    keeps_going = RowSampler([1], GenerationOptions(do_sample=False, max_new_tokens=5, ignore_eos=True), None, V)
    assert keeps_going.choose(only_eos.copy(), eos) == eos and not keeps_going.done and keeps_going.n_new == 1


def test_copy_rows_is_the_fancy_index():
    from gpt2np.engine import copy_rows

    cache = np.random.default_rng(0).standard_normal((2, 2, 5, 3, 7, 4)).astype(np.float32)
    rows = np.array([4, 0, 2])
    out = np.full((2, 2, 3, 3, 9, 4), np.nan, dtype=np.float32)
    copy_rows(out[:, :, :, :, 2:8], cache[:, :, :, :, 1:7], rows)
    assert (out[:, :, :, :, 2:8] == cache[:, :, rows, :, 1:7]).all()
    assert np.isnan(out[:, :, :, :, :2]).all() and np.isnan(out[:, :, :, :, 8:]).all()


def test_ragged_sampled_batch_with_penalty_rows_equal_rows_alone(small):
    """Rows with their own repetition penalty and sampler, leaving the batch at different steps
    (EOS allowed), produce what they produce alone from the same generator."""
    prompts = [[5] * 9, [17, 18], [400, 500, 600, 700], [9999]]
    options = [
        GenerationOptions(max_new_tokens=4, repetition_penalty=1.5, top_k=20),
        GenerationOptions(max_new_tokens=13, temperature=1.2),
        GenerationOptions(max_new_tokens=8, do_sample=False, repetition_penalty=2.0, ignore_eos=True),
        GenerationOptions(max_new_tokens=11, repetition_penalty=0.7, top_p=0.9),
    ]
    outs = [[] for _ in prompts]
    for _, step in decode(small, prompts, options, row_generators(3, 4)):
        for row, token in step.items():
            outs[row].append(token)
    assert len({len(o) for o in outs}) > 1  # the rows did leave at different steps
    for r, (p, o) in enumerate(zip(prompts, options)):
        alone = []
        for _, step in decode(small, [p], [o], [row_generators(3, 4)[r]]):
            alone.append(step[0])
        assert outs[r] == alone
