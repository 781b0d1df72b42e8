"""Prompt-lookup decoding: drafts copied from an earlier occurrence of the last n-gram, verified in one
pass of k + 1 positions. Greedy output is the plain greedy output, id for id; sampled output has the
plain sampling distribution (the speculative sampling rule). On the trained `tiny` model, which does
copy its prompt, so that drafts are accepted and rejected for real."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpt2np import GPT2
from gpt2np.engine import Engine, Row, prompt_lookup
from gpt2np.sampling import GenerationOptions, next_token, row_generators

# Code that repeats itself, so that the last tokens occurred before and drafts are found.
REPEATS = [
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n"
    "        return self.items.pop()\n\nclass Queue:\n    def push(self, item):\n        self.items",
    "import os\nimport sys\n\nimport os.path\nimport sys\n\nimport os",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n    print(j)\nfor k in range(",
    "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n",
]


@pytest.fixture(scope="module")
def tiny():
    return GPT2.from_pretrained("tiny")


def ids_of(model, texts):
    return [model.tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("k, n", [(1, 1), (3, 2), (10, 2), (10, 3), (25, 1)])
def test_greedy_ids_are_plain_greedys_in_a_ragged_batch(tiny, k, n):
    prompts = ids_of(tiny, REPEATS)  # four lengths: a left-padded batch
    plain = tiny.generate_ids(prompts, max_new_tokens=60, do_sample=False, ignore_eos=True)
    looked = tiny.generate_ids(
        prompts,
        max_new_tokens=60,
        do_sample=False,
        ignore_eos=True,
        prompt_lookup_num_tokens=k,
        max_matching_ngram_size=n,
    )
    assert looked == plain
    for alone, row in zip(prompts, looked):  # and each row as it comes alone
        assert tiny.generate_ids([alone], max_new_tokens=60, do_sample=False, ignore_eos=True)[0] == row


def test_drafts_are_really_accepted_and_rejected(tiny):
    """The case above is not vacuous: on this text the engine feeds drafts, keeps some and rolls back others."""
    options = GenerationOptions(do_sample=False, max_new_tokens=60, ignore_eos=True, prompt_lookup_num_tokens=10)
    row = Row(ids_of(tiny, REPEATS[:1])[0], options, None, tiny.config.vocab_size)
    engine = Engine(tiny)
    engine.add([row])
    fed = kept = steps = 0
    engine.choose()
    while engine.rows:
        engine.forward()
        drafts = len(row.drafts)
        produced = len(engine.choose())
        steps += 1
        fed += drafts
        kept += produced - 1 if drafts else 0
    print(f"{steps} steps for 60 tokens; drafts fed {fed}, accepted {kept}")
    assert row.n_new == 60 and steps < 45 and 0 < kept < fed


def test_stop_strings_eos_and_the_context_limit(tiny):
    prompt = REPEATS[0]
    for stop in (["\n\n"], ["items"], ["pop", "push("]):
        plain = tiny.generate(prompt, max_new_tokens=80, do_sample=False, stop=stop, return_full_text=False)
        looked = tiny.generate(
            prompt, max_new_tokens=80, do_sample=False, stop=stop, return_full_text=False, prompt_lookup_num_tokens=8
        )
        assert looked == plain and len(plain) < 300
    ids = ids_of(tiny, [prompt])[0]
    plain = tiny.generate_ids([ids], max_new_tokens=60, do_sample=False, ignore_eos=True)[0]
    # EOS: make the 12th greedy token the end of text; a copied run of drafts passes over it
    eos = plain[11]
    ends = GPT2(dataclasses.replace(tiny.config, eos_token_id=eos), tiny.params, tiny.tokenizer)
    expected = ends.generate_ids([ids], max_new_tokens=60, do_sample=False)[0]
    assert expected == plain[: plain.index(eos)]
    assert ends.generate_ids([ids], max_new_tokens=60, do_sample=False, prompt_lookup_num_tokens=10)[0] == expected
    # the context: a prompt that leaves 12 tokens of the 256, drafts never past the last one
    long = (ids * 10)[: tiny.config.n_ctx - 12]
    plain = tiny.generate_ids([long], max_new_tokens=12, do_sample=False, ignore_eos=True)[0]
    assert tiny.generate_ids([long], max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=20)[0] == plain


def test_rows_with_and_without_lookup_share_a_batch(tiny):
    """Rows of one engine with different lookahead, penalties and lengths: each gets its own plain
    greedy ids; rows that join while a step's drafts wait to be verified keep theirs."""
    prompts = ids_of(tiny, REPEATS)
    settings = [
        dict(prompt_lookup_num_tokens=10),
        dict(),
        dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=1, repetition_penalty=1.3),
        dict(prompt_lookup_num_tokens=5, max_new_tokens=17),
    ]

    def options(**extra):
        return GenerationOptions(**({"do_sample": False, "max_new_tokens": 40, "ignore_eos": True} | extra))

    expected = []
    for ids, extra in zip(prompts, settings):
        plain = {k: v for k, v in extra.items() if not k.startswith(("prompt_lookup", "max_matching"))}
        expected.append(
            tiny.generate_ids([ids], **(dict(do_sample=False, max_new_tokens=40, ignore_eos=True) | plain))[0]
        )
    rows = [Row(ids, options(**extra), None, tiny.config.vocab_size) for ids, extra in zip(prompts, settings)]
    engine = Engine(tiny)
    engine.add(rows[:2])
    steps = 0
    while engine.rows or steps < 3:
        if steps == 2:
            engine.add(rows[2:])  # between a forward (which fed drafts) and the next choose
        engine.choose()
        engine.forward()
        steps += 1
    assert [r.new_ids for r in rows] == expected


def test_log_probs_with_lookup_are_the_plain_ones(tiny):
    prompt = REPEATS[1]
    plain = tiny.complete(prompt, max_new_tokens=30, do_sample=False, logprobs=2)
    looked = tiny.complete(prompt, max_new_tokens=30, do_sample=False, logprobs=2, prompt_lookup_num_tokens=6)
    assert looked.ids == plain.ids
    for a, b in zip(looked.log_probs, plain.log_probs):
        assert a.token == b.token and np.array_equal(a.top_ids, b.top_ids)
        assert abs(a.log_prob - b.log_prob) < 1e-5


def test_the_speculative_rule_draws_each_token_with_its_probability():
    """next_token with a draft, on fixed logits: over many draws, the frequencies are the warped
    distribution's (a chi-square test at p = 0.001), for a likely draft, an unlikely one, and one
    that top_k removed."""
    rng = np.random.default_rng(0)
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)
    options = GenerationOptions(temperature=0.9, top_k=5)
    z = logits.astype(np.float64) / 0.9
    p = np.exp(z - z.max())
    p[5] = 0  # top_k 5 removes the last token
    p /= p.sum()
    N = 40_000
    for draft in (0, 3, 5):
        counts = np.bincount([next_token(logits.copy(), options, rng, draft=draft) for _ in range(N)], minlength=6)
        expected = p * N
        chi2 = float((((counts - expected) ** 2)[p > 0] / expected[p > 0]).sum())
        print(f"draft {draft}: counts {counts.tolist()}, chi-square {chi2:.1f} (4 degrees of freedom)")
        assert counts[5] == 0 and chi2 < 18.47  # the 0.999 quantile of chi-square with 4 degrees of freedom


def test_sampled_continuations_have_the_plain_distribution(tiny):
    """The model's sampled continuation after a repeated text, over 1,600 seeded rows with and without
    lookup: the second and third tokens (drawn in steps that verify drafts; the first comes from the
    prefill) have the same distribution, by a chi-square test of homogeneity at p = 0.001 on the most
    frequent tokens, the rest pooled. The draws themselves differ: the rule uses its random numbers
    its own way."""
    ids = tiny.tokenizer.encode("import os\nimport sys\nimport os\nimport sys\nimport")
    N, options = 1600, dict(max_new_tokens=3, temperature=1.0, ignore_eos=True)
    plain = np.array(tiny.generate_ids([ids] * N, seed=1, **options))
    looked = np.array(tiny.generate_ids([ids] * N, seed=2, prompt_lookup_num_tokens=4, **options))
    quantile = {5: 20.5, 6: 22.5}  # chi-square's 0.999 quantiles by degrees of freedom
    for position in (1, 2):
        a, b = plain[:, position], looked[:, position]
        values, counts = np.unique(np.concatenate([a, b]), return_counts=True)
        top = values[np.argsort(-counts)[:6]]
        table = np.array([[*(np.sum(x == t) for t in top), np.sum(~np.isin(x, top))] for x in (a, b)], dtype=float)
        table = table[:, table.sum(axis=0) > 0]
        expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
        chi2 = float(((table - expected) ** 2 / expected).sum())
        dof = table.shape[1] - 1
        print(f"token {position}: {top.tolist()} + rest, counts {table.astype(int).tolist()}, chi-square {chi2:.1f}")
        assert chi2 < quantile[dof]
    assert np.mean(looked[:, 1] == 198) > 0.25  # a newline after "import os": the draft the repeat offers


def test_prompt_lookup_finds_the_most_recent_occurrence():
    options = GenerationOptions(max_new_tokens=50, prompt_lookup_num_tokens=3, max_matching_ngram_size=2)
    row = Row([1, 2, 3, 4, 9, 1, 2, 7, 8, 5, 1, 2], options, None, 100)
    assert prompt_lookup(row, 12, 1024) == [7, 8, 5]  # after the later [1, 2], not the first
    assert prompt_lookup(row, 1022, 1024) == [7]  # the context leaves room for one draft
    row = Row([5, 6, 7, 6], options, None, 100)
    assert prompt_lookup(row, 4, 1024) == [7, 6]  # no bigram match: the last token alone, [6]
    assert prompt_lookup(Row([1, 2, 3], options, None, 100), 3, 1024) == []
    short = dataclasses.replace(options, max_new_tokens=2)
    assert prompt_lookup(Row([1, 2, 1], short, None, 100), 3, 1024) == [2]  # room for 1 draft + 1 token


@pytest.mark.parametrize(
    "bad, error",
    [
        (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be >= 1"),
        (dict(prompt_lookup_num_tokens=2.5), "prompt_lookup_num_tokens must be an integer"),
        (dict(max_matching_ngram_size=0), "max_matching_ngram_size must be >= 1"),
    ],
)
def test_bad_lookup_options_name_the_fix(tiny, bad, error):
    with pytest.raises((ValueError, TypeError), match=error):
        tiny.generate("x", **bad)


def test_seeded_sampling_with_lookup_is_reproducible_alone_or_in_a_batch(tiny):
    ids = ids_of(tiny, REPEATS)
    first = tiny.generate_ids(ids, max_new_tokens=20, seed=5, prompt_lookup_num_tokens=4)
    assert tiny.generate_ids(ids, max_new_tokens=20, seed=5, prompt_lookup_num_tokens=4) == first
    rng = row_generators(5, 4)[2]  # row 2 of the batch draws from the seed's child 2, alone too
    from gpt2np.generation import generate_ids

    options = GenerationOptions(max_new_tokens=20, prompt_lookup_num_tokens=4)
    assert generate_ids(tiny, [ids[2]], options, [rng]) == [first[2]]
