"""Log-probs in the library (`GPT2.complete`, `GPT2.score`) and OpenAI's additive penalties and
logit_bias in the sampler. Scoring is checked against gpt2np.evaluate's, which the evaluation tests
check against transformers."""

import numpy as np
import pytest

from gpt2np import GPT2, GPT2Config
from gpt2np.engine import Engine, Row
from gpt2np.sampling import GenerationOptions, LogitAdjustments, OptionError, apply_count_penalties, next_token
from gpt2np.scoring import score_tokens

TOY = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=128)


@pytest.fixture(scope="module")
def model() -> GPT2:
    return GPT2.from_random(TOY, seed=3)


def test_score_equals_evaluate_scoring(model):
    text = "The quick brown fox jumps over the lazy dog, again and again."
    scored = model.score(text, top=3)
    ids = model.tokenizer.encode(text)
    ((reference, _),) = score_tokens(model, [(ids, 1)], progress=False)
    assert scored.ids == ids and scored.log_probs.dtype == np.float64
    np.testing.assert_allclose(scored.log_probs, reference, rtol=0, atol=1e-5)
    assert scored.top_ids.shape == scored.top_log_probs.shape == (len(ids) - 1, 3)
    full = np.log(np.exp(model(np.array(ids)).astype(np.float64)).sum(-1))  # log-sum-exp per position
    logits = model(np.array(ids)).astype(np.float64)
    expected_top = np.argsort(-logits, axis=-1, kind="stable")[:-1, :3]
    assert (scored.top_ids == expected_top).all()
    np.testing.assert_allclose(
        scored.top_log_probs, np.take_along_axis(logits[:-1], expected_top, -1) - full[:-1, None], atol=1e-5
    )
    assert (np.diff(scored.top_log_probs, axis=-1) <= 0).all()


def test_score_of_ids_and_of_one_token(model):
    ids = model.tokenizer.encode("Hello world")
    assert model.score(ids).log_probs.tolist() == model.score("Hello world").log_probs.tolist()
    one = model.score("Hello")
    assert len(one.ids) == 1 and one.log_probs.shape == (0,) and one.top_ids.shape == (0, 0)
    with pytest.raises(ValueError, match="empty"):
        model.score("")
    with pytest.raises(OptionError, match=r"top must be in \[0, 5\]"):
        model.score("Hello world", top=6)


@pytest.mark.parametrize(
    "options",
    [
        dict(do_sample=False),
        dict(temperature=0.5, top_p=0.9, seed=2),
        dict(temperature=1.3, top_k=5, repetition_penalty=1.3, seed=4),
    ],
)
def test_generated_log_probs_are_the_model_s_own(model, options):
    """Whatever the sampler did (temperature, top-k, top-p, penalty), the log-probs reported are
    those of the raw model: what scoring the prompt and continuation gives."""
    done = model.complete("Once upon a time", logprobs=2, max_new_tokens=12, **options)
    assert len(done.log_probs) == len(done.ids) > 0
    scored = model.score(done.prompt_ids + done.ids, top=2)
    tail = slice(len(done.prompt_ids) - 1, None)
    np.testing.assert_allclose([t.log_prob for t in done.log_probs], scored.log_probs[tail], atol=1e-5)
    assert [t.top_ids.tolist() for t in done.log_probs] == scored.top_ids[tail].tolist()
    np.testing.assert_allclose([t.top_log_probs for t in done.log_probs], scored.top_log_probs[tail], atol=1e-5)
    assert [t.token for t in done.log_probs] == done.ids


def test_complete_is_generate_with_more(model):
    prompts = ["Hello", "A longer prompt than the first"]
    texts = model.generate(prompts, max_new_tokens=9, seed=5, return_full_text=False)
    done = model.complete(prompts, max_new_tokens=9, seed=5)
    assert [d.text for d in done] == texts and all(d.log_probs is None for d in done)
    assert model.complete(prompts[0], max_new_tokens=9, seed=5) == done[0]
    assert done[0].finish_reason == "length" and len(done[0].ids) == 9
    stop = done[0].text[3:6]
    stopped = model.complete(prompts[0], max_new_tokens=9, seed=5, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == done[0].text[: done[0].text.find(stop)]


def test_rows_that_ask_nothing_compute_nothing(model):
    options = GenerationOptions(do_sample=False, max_new_tokens=3)
    rows = [
        Row([1, 2], options, np.random.default_rng(0), TOY.vocab_size),
        Row([1, 2], options, np.random.default_rng(0), TOY.vocab_size, logprobs=0),
    ]
    engine = Engine(model)
    engine.add(rows)
    while engine.rows:
        engine.choose()
        engine.forward()
    assert rows[0].log_probs == [] and len(rows[1].log_probs) == 3
    assert rows[1].log_probs[0].top_ids.shape == (0,)
    assert rows[0].sampler.n_new == rows[1].sampler.n_new == 3


def test_count_penalties_are_openai_s_formula():
    logits = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    counts = np.array([0, 1, 3, 0])
    apply_count_penalties(logits, counts, presence_penalty=0.5, frequency_penalty=0.25)
    assert logits.tolist() == [1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]


def test_logit_bias_and_penalties_steer_the_choice(model):
    bias = model.complete("Hello", do_sample=False, max_new_tokens=4, logit_bias={42: 100})
    assert bias.ids == [42] * 4
    banned = model.complete("Hello", do_sample=False, max_new_tokens=1)
    avoided = model.complete("Hello", do_sample=False, max_new_tokens=1, logit_bias={banned.ids[0]: -100})
    assert avoided.ids != banned.ids
    repeated = model.complete("Hello", do_sample=False, max_new_tokens=6, logit_bias={42: 5}, ignore_eos=True)
    penalized = model.complete(
        "Hello",
        do_sample=False,
        max_new_tokens=6,
        logit_bias={42: 5},
        frequency_penalty=2,
        presence_penalty=2,
        ignore_eos=True,
    )
    assert repeated.ids.count(42) == 6 and penalized.ids.count(42) < 6
    # the sampler alone: the penalty applies to generated tokens, not to the prompt
    logits = np.zeros(5, dtype=np.float32)
    logits[3] = 1.0
    adjust = LogitAdjustments(presence_penalty=2.0)
    assert (
        next_token(
            logits.copy(), GenerationOptions(do_sample=False), None, adjust=adjust, counts=np.array([0, 0, 0, 1, 0])
        )
        == 0
    )
    assert (
        next_token(
            logits.copy(), GenerationOptions(do_sample=False), None, adjust=adjust, counts=np.zeros(5, dtype=int)
        )
        == 3
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(logit_bias={5: 101}), r"logit_bias\[5\] must be in \[-100, 100\]"),
        (dict(logit_bias={-1: 1}), "logit_bias token ids must be >= 0"),
        (dict(logprobs=6), r"logprobs must be in \[0, 5\]"),
    ],
)
def test_bad_log_probs_and_adjustments_name_the_option(model, kwargs, message):
    with pytest.raises(OptionError, match=message):
        model.complete("Hi", max_new_tokens=2, **kwargs)


def test_a_logit_bias_token_outside_the_vocabulary(model):
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 50257\), got 60000"):
        model.complete("Hi", max_new_tokens=2, logit_bias={60000: 1})
