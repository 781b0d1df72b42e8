"""The engine's chunked prefill: a long prompt run a chunk per step, between decoding steps, gives the
one-pass prefill's logits (within 1e-5) and the same greedy tokens."""

import numpy as np
import pytest

from gpt2np import GPT2, GPT2Config
from gpt2np.engine import Engine, Row
from gpt2np.sampling import GenerationOptions

CONFIG = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=256)
GREEDY = GenerationOptions(max_new_tokens=12, do_sample=False, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> GPT2:
    return GPT2.from_random(CONFIG, seed=0)


def prompts(n: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 50000, size=length).tolist() for length in lengths]


def rows(model, ids: list[list[int]], options: GenerationOptions = GREEDY) -> list[Row]:
    return [Row(p, options, np.random.default_rng(0), model.config.vocab_size) for p in ids]


def decode(engine: Engine, batch: list[Row]) -> tuple[list[np.ndarray], list[list[int]]]:
    """Step the engine until every row is done: (each step's logits per row, each row's tokens)."""
    logits, tokens = [], {id(r): [] for r in batch}
    while engine.busy:
        if engine.rows:
            logits.append({id(r): engine.logits[i].copy() for i, r in enumerate(engine.rows)})
        for row, token in engine.choose():
            tokens[id(row)].append(token)
        engine.forward()
    return logits, [tokens[id(r)] for r in batch]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_pass(model, chunk):
    ids = prompts(1, [150, 3, 90])
    one_pass, chunked = Engine(model), Engine(model, prefill_chunk=chunk)
    a, b = rows(model, ids), rows(model, ids)
    one_pass.add(a)
    chunked.add(b)
    assert chunked.waiting == b and not chunked.rows  # nothing ran yet: a chunk per forward()
    n_chunks = 0
    while not chunked.rows:
        chunked.forward()
        n_chunks += 1
    assert n_chunks == -(-150 // max(1, chunk // 3))  # the columns of the longest, a chunk at a time
    np.testing.assert_allclose(chunked.logits, one_pass.logits, rtol=1e-5, atol=1e-5)
    assert decode(chunked, b)[1] == decode(one_pass, a)[1]


def test_long_prompt_is_prefilled_between_decoding_steps(model):
    """A row decodes while a long prompt is prefilled beside it, one chunk per step; both rows then
    give the tokens each gives alone, and the logits match within 1e-5."""
    short, long = prompts(2, [5, 200])
    engine = Engine(model, prefill_chunk=16)
    longer = GenerationOptions(max_new_tokens=40, do_sample=False, ignore_eos=True)
    first = rows(model, [short], longer)
    engine.add(first)  # 5 tokens: one pass
    assert engine.rows == first
    engine.choose()
    engine.forward()
    second = rows(model, [long])
    engine.add(second)
    steps_before_join = 0
    while engine.waiting:
        assert engine.rows == first  # the short row keeps decoding meanwhile
        engine.choose()
        engine.forward()
        steps_before_join += 1
    assert steps_before_join == 200 // 16 + 1
    alone = {}
    for p, options in ((short, longer), (long, GREEDY)):
        e = Engine(model)
        r = rows(model, [p], options)
        e.add(r)
        alone[len(p)] = decode(e, r)[1][0]
    _, tokens = decode(engine, first + second)
    assert tokens[1] == alone[200]
    assert tokens[0] == alone[5][1 + steps_before_join :]  # its first tokens were chosen above


def test_unchunked_engine_is_unchanged(model):
    """Without prefill_chunk every prompt, however long, is prefilled at once in add()."""
    engine = Engine(model)
    engine.add(rows(model, prompts(3, [200])))
    assert engine.rows and not engine.waiting


def test_chunked_prefill_bounds_the_memory_of_long_prompts():
    """Eight prompts of 500 tokens: one pass holds every layer's activations for 4,000 positions (and
    a block of scores per head); a chunk per step holds them for a chunk only. NumPy reports its
    buffers to tracemalloc, so the peaks are NumPy's own."""
    import tracemalloc

    model = GPT2.from_random(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=512), seed=0)
    ids = prompts(4, [500] * 8)
    peaks = {}
    for chunk in (None, 64):
        engine = Engine(model, prefill_chunk=chunk)
        tracemalloc.start()
        engine.add(rows(model, ids))
        while not engine.rows:
            engine.forward()
        peaks[chunk] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[64] < peaks[None] / 2, peaks  # measured: 20.3 MB in one pass, 5.9 MB chunked


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_rows_score_their_prompts_while_prefilled_as_score_gives_them(model, chunk):
    """Prompt scoring as rows of the batch (what /v1/completions' echo uses): chunked or not, left
    padded beside longer prompts, beside rows that generate, each prompt's log-probs and top-3
    alternatives equal GPT2.score's; a score-only row ends after its prefill and chooses nothing,
    and a row that scores and generates gives the same tokens as a plain row."""
    ids = prompts(5, [40, 9, 1, 60])
    engine = Engine(model, prefill_chunk=chunk)
    batch = [
        Row(ids[0], GREEDY, None, model.config.vocab_size, prompt_logprobs=3, score_only=True),
        Row(ids[1], GREEDY, None, model.config.vocab_size, prompt_logprobs=3),
        Row(ids[2], GREEDY, None, model.config.vocab_size, prompt_logprobs=3, score_only=True),
        Row(ids[3], GREEDY, None, model.config.vocab_size),
    ]
    engine.add(batch)
    _, tokens = decode(engine, batch)
    assert tokens[0] == tokens[2] == [] and len(tokens[1]) == len(tokens[3]) == GREEDY.max_new_tokens
    plain = Engine(model)
    alone = rows(model, [ids[1]])
    plain.add(alone)
    assert decode(plain, alone)[1][0] == tokens[1]
    worst = 0.0
    for row, prompt in zip(batch[:3], ids[:3]):
        expected = model.score(prompt, top=3)
        got = row.prompt_scores
        assert len(got.log_probs) == len(prompt) - 1
        assert np.array_equal(got.top_ids, expected.top_ids)
        worst = max(worst, float(np.abs(got.log_probs - expected.log_probs).max(initial=0)))
        np.testing.assert_allclose(got.top_log_probs, expected.top_log_probs, atol=1e-5)
    print(f"prompt log-probs scored in the batch vs GPT2.score: worst difference {worst:.1e}")
    assert worst < 1e-5
    assert batch[3].prompt_scores is None
