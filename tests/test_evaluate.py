"""gpt2np.evaluate: the sliding window, LAMBADA, cloze scoring, data files, the command, downloads.

Offline tests use a small random model and check invariants against direct forward passes.
The reference tests build a random full-size GPT-2 (124M shape), load the same folder into
transformers, and compute every metric with plain torch code written here: the two must agree
within 1e-4 relative.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2np import GPT2, GPT2Config, evaluate
from gpt2np.checkpoint import random_state_dict, save_checkpoint
from gpt2np.evaluate import (
    cbt,
    cbt_detokenize,
    cloze_choices,
    count_words,
    lambada,
    multiple_choice,
    perplexity,
    ptb_detokenize,
    read_cbt,
    read_char_test,
    read_lambada,
    sliding_windows,
    split_last_word,
    wikitext_detokenize,
)
from gpt2np.model import causal_mask, gpt2, lm_head

SMALL = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_ctx=64)
PROSE = (
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times, "
    "it was the age of wisdom, it was the age of foolishness. Call me Ishmael. Some years ago, never mind "
    "how long precisely, having little or no money in my purse, and nothing particular to interest me on "
    "shore, I thought I would sail about a little and see the watery part of the world. "
) * 2


@pytest.fixture(scope="module")
def small():
    return GPT2.from_random(SMALL, seed=0)


def log_softmax64(logits):  # [..., V] -> [..., V], float64
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def direct_nll(model, ids, windows):
    """Sum of -log p over each window's scored tokens, one plain forward pass per window."""
    total = 0.0
    for begin, end, first in windows:
        log_probs = log_softmax64(model(ids[begin:end])[first - begin - 1 : -1])  # rows predicting first..end-1
        total -= log_probs[np.arange(end - first), ids[first:end]].sum()
    return total


def greedy_tokens(model, ids, n):
    """The model's n greedy next tokens (logits of the last position only: quick on a full-size model)."""
    ids = list(ids)
    for _ in range(n):
        T = len(ids)
        x = gpt2(
            np.array([ids]),
            np.arange(T)[None],
            model.params,
            model.config,
            mask=causal_mask(np.ones((1, T), dtype=bool), 0, T),
        )
        ids.append(int(np.argmax(lm_head(x[0, -1], model.lm_head_weight))))
    return ids[-n:]


def as_word(tokenizer, ids):
    """`" word"` -> "word" when the ids spell a space and letters and tokenize back to the same ids."""
    text = tokenizer.decode(ids)
    if len(text) > 1 and text[0] == " " and text[1:].isalpha() and tokenizer.encode(text) == list(ids):
        return text[1:]
    return None


def greedy_examples(model, contexts, n_tokens):
    """LAMBADA passages whose last word (of n_tokens tokens) is exactly the model's greedy output."""
    found = []
    for context in contexts:
        ids = model.tokenizer.encode(context)[-(model.config.n_ctx - n_tokens) :]
        word = as_word(model.tokenizer, greedy_tokens(model, ids, n_tokens))
        if word is not None:
            found.append(f"{context} {word}")
    return found


def word_contexts(text, *, words, count, step=3):
    tokens = text.split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words, step)][:count]


# --------------------------------------------------------------------------------------------
# The sliding window


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 400), st.integers(2, 80), st.data())
def test_sliding_windows_score_every_token_once(n_tokens, max_length, data):
    stride = data.draw(st.integers(1, max_length))
    windows = sliding_windows(n_tokens, max_length=max_length, stride=stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, n_tokens))  # every token but the first, once, in order
    step = min(stride, max_length - 1)
    for k, (begin, end, first) in enumerate(windows):
        assert begin == k * step and end - begin <= max_length
        assert begin < first < end
        if k > 0:  # each scored token has at least max_length - step tokens of context
            assert first - begin == max_length - step


@pytest.mark.parametrize(
    "n_tokens, max_length, stride", [(1000, 1024, 512), (3000, 1024, 512), (2500, 256, 128), (77, 10, 3)]
)
def test_sliding_windows_are_huggingfaces_when_stride_is_below_max_length(n_tokens, max_length, stride):
    """The loop of HuggingFace's "perplexity of fixed-length models" guide, restated."""
    expected, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        expected.append((begin, end, max(prev_end, 1)))
        prev_end = end
        if end == n_tokens:
            break
    assert sliding_windows(n_tokens, max_length=max_length, stride=stride) == expected


def test_sliding_windows_with_stride_equal_to_max_length_overlap_by_one_token():
    assert sliding_windows(10, max_length=4, stride=4) == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]


@pytest.mark.parametrize("max_length, stride, words", [(8, 9, "stride"), (8, 0, "stride"), (1, 1, "max_length")])
def test_sliding_windows_reject_gaps_and_empty_windows(max_length, stride, words):
    with pytest.raises(ValueError, match=words):
        sliding_windows(100, max_length=max_length, stride=stride)


# --------------------------------------------------------------------------------------------
# Perplexity on a small random model


@pytest.mark.parametrize("max_length, stride, chars", [(64, 32, None), (32, 7, None), (16, 16, None), (2, 1, 120)])
def test_perplexity_equals_direct_forward_passes(small, max_length, stride, chars):
    text = PROSE[:chars]
    ids = small.tokenizer.encode(text)
    result = perplexity(small, text, max_length=max_length, stride=stride, progress=False)
    windows = sliding_windows(len(ids), max_length=max_length, stride=stride)
    expected = direct_nll(small, ids, windows) / (len(ids) - 1)
    assert result["tokens"] == len(ids) - 1 and result["windows"] == len(windows)
    assert result["nll"] == pytest.approx(expected, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-6)


def test_perplexity_does_not_depend_on_batch_size(small):
    runs = [perplexity(small, PROSE, max_length=48, stride=20, batch_size=b, progress=False) for b in (1, 3, 64)]
    for run in runs[1:]:
        assert run["nll"] == pytest.approx(runs[0]["nll"], rel=1e-6)
        assert run["tokens"] == runs[0]["tokens"]


def test_text_shorter_than_one_window_is_one_forward_pass(small):
    text = "A short text, well under one window."
    ids = small.tokenizer.encode(text)
    result = perplexity(small, text, progress=False)  # max_length = n_ctx = 64 > len(ids)
    log_probs = log_softmax64(small(ids))
    expected = -sum(log_probs[t - 1, ids[t]] for t in range(1, len(ids))) / (len(ids) - 1)
    assert result["windows"] == 1 and result["tokens"] == len(ids) - 1
    assert result["nll"] == pytest.approx(expected, rel=1e-6)


def test_stride_equal_to_max_length_scores_disjoint_chunks(small):
    ids = small.tokenizer.encode(PROSE)
    result = perplexity(small, PROSE, max_length=32, stride=32, progress=False)
    assert result["tokens"] == len(ids) - 1
    assert result["windows"] == math.ceil((len(ids) - 1) / 31)
    chunks = [(b, min(b + 32, len(ids)), b + 1 if b else 1) for b in range(0, len(ids) - 1, 31)]
    assert result["nll"] == pytest.approx(direct_nll(small, ids, chunks) / (len(ids) - 1), rel=1e-6)


def test_prepend_eot_scores_the_first_token_too(small):
    text = "Hello world, this is a test."
    ids = small.tokenizer.encode(text)
    result = perplexity(small, text, prepend_eot=True, progress=False)
    with_eot = [small.tokenizer.eot_token] + ids
    log_probs = log_softmax64(small(with_eot))
    expected = -sum(log_probs[t - 1, with_eot[t]] for t in range(1, len(with_eot))) / len(ids)
    assert result["tokens"] == len(ids) and result["bytes"] == len(text.encode())
    assert result["nll"] == pytest.approx(expected, rel=1e-6)
    assert perplexity(small, "Hi", prepend_eot=True, progress=False)["tokens"] == 1  # one token is enough


def test_bytes_bits_per_byte_and_words(small):
    text = "naïve café — déjà vu. " * 5
    tokenizer = small.tokenizer
    ids = tokenizer.encode(text)
    result = perplexity(small, text, max_length=16, stride=8, words=True, progress=False)
    assert result["bytes"] == len(text.encode()) - len(tokenizer.decode_bytes(ids[:1]))  # bytes of the scored tokens
    total = result["nll"] * result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / result["bytes"], rel=1e-12)
    assert result["words"] == len(text.split()) == 25
    assert result["ppl_word"] == pytest.approx(math.exp(total / 25), rel=1e-12)
    assert perplexity(small, text, max_length=16, stride=8, words=123, progress=False)["words"] == 123


def test_limit_scores_only_the_first_tokens(small):
    ids = small.tokenizer.encode(PROSE)
    limited = perplexity(small, PROSE, max_length=16, stride=8, limit=40, progress=False)
    expected = direct_nll(small, ids[:40], sliding_windows(40, max_length=16, stride=8)) / 39
    assert limited["tokens"] == 39 and limited["nll"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "text, options, message",
    [
        ("", {}, "at least 2"),
        ("Hi", {}, "prepend_eot=True"),
        (PROSE, {"max_length": 65}, "max_length <= 64"),
        (PROSE, {"max_length": 16, "stride": 17}, "stride"),
        (PROSE, {"words": True, "limit": 10}, "not both"),
        (PROSE, {"limit": 0}, "limit"),
        (PROSE, {"batch_size": 0}, "batch_size"),
    ],
)
def test_perplexity_errors_name_the_fix(small, text, options, message):
    with pytest.raises(ValueError, match=message):
        perplexity(small, text, progress=False, **options)


def test_target_log_probs_are_normalised_and_exact():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((300, 16), dtype=np.float32) * 4  # large logits: log-sum-exp must be careful
    wte = rng.standard_normal((1000, 16), dtype=np.float32)
    targets = rng.integers(0, 1000, 300)
    log_probs, greedy, _, _ = evaluate.target_log_probs(hidden, wte, targets, rows=64)
    expected = log_softmax64(hidden.astype(np.float64) @ wte.T.astype(np.float64))
    np.testing.assert_allclose(log_probs, expected[np.arange(300), targets], rtol=0, atol=2e-5)
    np.testing.assert_array_equal(greedy, (hidden @ wte.T).argmax(-1) == targets)


# --------------------------------------------------------------------------------------------
# LAMBADA and cloze on a small random model


def test_split_last_word():
    assert split_last_word("  he gave the ball to Tom \n") == ("he gave the ball to", " Tom")
    with pytest.raises(ValueError, match="last word"):
        split_last_word("Tom")


def test_lambada_one_token_and_several_token_words(small):
    contexts = word_contexts(PROSE, words=12, count=40)
    one = greedy_examples(small, contexts, 1)
    two = greedy_examples(small, contexts, 2)
    assert one and two, "the fixed random model should write some clean words greedily"
    assert all(len(small.tokenizer.encode(" " + p.split()[-1])) == 1 for p in one)
    assert all(len(small.tokenizer.encode(" " + p.split()[-1])) == 2 for p in two)
    result = lambada(small, one + two, progress=False)
    assert result["accuracy"] == 1.0 and result["accuracy_last_token"] == 1.0
    assert result["examples"] == len(one) + len(two) and result["tokens"] == len(one) + 2 * len(two)


def test_lambada_needs_the_whole_word_not_only_its_last_token(small):
    """A two-token word whose second token is greedy but whose first is not: wrong for LAMBADA's
    whole-word rule, right for the looser last-token rule."""
    tokenizer = small.tokenizer
    found = None
    for context in word_contexts(PROSE, words=10, count=30):
        ids = tokenizer.encode(context)
        best = greedy_tokens(small, ids, 1)[0]
        for start in (" bright", " under", " water", " stone", " fire", " light", " ship", " sand", " rain"):
            first = tokenizer.encode(start)
            if first[0] == best:
                continue
            word = as_word(tokenizer, first + greedy_tokens(small, ids + first, 1))
            if word is not None:
                found = f"{context} {word}"
                break
        if found:
            break
    assert found is not None
    result = lambada(small, [found], progress=False)
    assert result["accuracy"] == 0.0 and result["accuracy_last_token"] == 1.0


def test_lambada_perplexity_equals_direct_scoring(small):
    passages = [" ".join(PROSE.split()[i : i + n]) for i, n in ((0, 9), (5, 20), (11, 4), (30, 70))]
    result = lambada(small, passages, progress=False, batch_size=3)
    nll, tokens = [], 0
    for passage in passages:
        context, target = split_last_word(passage)
        ctx, tgt = small.tokenizer.encode(context), small.tokenizer.encode(target)
        ids = (ctx + tgt)[-SMALL.n_ctx :]  # a 70-word passage is longer than the context: cut on the left
        log_probs = log_softmax64(small(ids))
        first = len(ids) - len(tgt)
        nll.append(-sum(log_probs[t - 1, ids[t]] for t in range(first, len(ids))))
        tokens += len(tgt)
    assert result["tokens"] == tokens
    assert result["ppl"] == pytest.approx(math.exp(sum(nll) / tokens), rel=1e-6)
    assert result["ppl_word"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)


def test_lambada_errors(small):
    with pytest.raises(ValueError, match="at least one"):
        lambada(small, [], progress=False)
    with pytest.raises(ValueError, match="last word"):
        lambada(small, ["oneword"], progress=False)


def test_multiple_choice_sums_log_probs_of_each_continuation(small):
    context, candidates = "The cat sat on the", [" mat.", " dog and slept.", " roof"]
    result = multiple_choice(small, context, candidates, progress=False)
    ctx = small.tokenizer.encode(context)
    for score, candidate in zip(result["scores"], candidates):
        ids = ctx + small.tokenizer.encode(candidate)
        log_probs = log_softmax64(small(ids))
        assert score == pytest.approx(sum(log_probs[t - 1, ids[t]] for t in range(len(ctx), len(ids))), rel=1e-6)
    assert result["best"] == int(np.argmax(result["scores"]))
    with pytest.raises(ValueError, match="candidates"):
        multiple_choice(small, context, [], progress=False)


CBT_FILE = """\
1 `` Well , '' said the old man , `` I do n't know .
2 The boy looked at the sea and the ship .
21 The XXXXX was gone by morning , '' he said .\tship\t\tsea|ship|man

1 Mary had a little lamb .
2 Its fleece was white as snow .
21 Everywhere that XXXXX went , the lamb was sure to go .\tMary\t\tlamb|snow|Mary
"""


def test_cbt_reads_the_release_format_and_picks_the_likeliest_completion(small, tmp_path):
    path = tmp_path / "cbtest_CN_test_2500ex.txt"
    path.write_text(CBT_FILE)
    examples = read_cbt(path)
    assert [e.answer for e in examples] == ["ship", "Mary"] and examples[1].candidates == ("lamb", "snow", "Mary")
    context, continuations = cloze_choices(examples[0])
    assert context == '"Well," said the old man, "I don\'t know. The boy looked at the sea and the ship. The'
    assert continuations == [
        ' sea was gone by morning," he said.',
        ' ship was gone by morning," he said.',
        ' man was gone by morning," he said.',
    ]
    picks = []
    for example in examples:
        context, continuations = cloze_choices(example)
        best = multiple_choice(small, context, continuations, progress=False)["best"]
        picks.append(example.candidates[best] == example.answer)
    result = cbt(small, examples, progress=False, batch_size=2)
    assert result == {"accuracy": float(np.mean(picks)), "examples": 2, "detokenizer": "cbt", "prepend_eot": False}
    # Answer each question with the model's own pick: accuracy 1.
    chosen = [
        dataclasses.replace(e, answer=e.candidates[multiple_choice(small, *cloze_choices(e), progress=False)["best"]])
        for e in examples
    ]
    assert cbt(small, chosen, progress=False)["accuracy"] == 1.0


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ("1 a story line .\n", "no CBT question"),
        ("one two\n", "numbered CBT line"),
        ("1 story .\n21 no blank here\tx\t\tx|y\n", "query line"),
        ("1 story .\n21 the XXXXX .\tz\t\tx|y\n", "one of the candidates"),
    ],
)
def test_malformed_cbt_files_are_named(tmp_path, content, message):
    path = tmp_path / "cbt.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_cbt(path)


# --------------------------------------------------------------------------------------------
# Detokenizers and data files


def test_wikitext_detokenizer():
    raw = (
        " \n = = Early life = = \n The 1 @,@ 000 @-@ year state @-@ of @-@ the @-@ art ( see below ) , "
        '3 @.@ 5 m ; " quoted " . \n'
    )
    assert (
        wikitext_detokenize(raw)
        == '\n== Early life ==\nThe 1,000-year state-of-the-art (see below), 3.5 m; "quoted".\n'
    )
    assert wikitext_detokenize("the players ' union 's rules") == "the players' union's rules"


def test_ptb_and_cbt_detokenizers():
    ptb = " the company 's shares do n't move \n it 's N <unk> \n"
    assert ptb_detokenize(ptb) == "the company's shares don't move\nit's N <unk>\n"
    cbt_text = "`` Yes , '' he said ; `` it 's -LRB- mostly -RRB- fine ! ''"
    assert cbt_detokenize(cbt_text) == '"Yes," he said; "it\'s (mostly) fine!"'
    assert evaluate.detokenize("a @-@ b", style="none") == "a @-@ b"
    with pytest.raises(ValueError, match="wikitext"):
        evaluate.detokenize("x", style="moses")


def test_count_words_in_canonical_units():
    text = " the cat sat \n\n on the mat \n"
    assert count_words(text) == 6
    assert count_words(text, eos_per_line=True) == 9  # one <eos> for each of the three lines


def test_read_lambada_json_lines_and_plain_text(tmp_path):
    jsonl = tmp_path / "lambada_test.jsonl"
    jsonl.write_text('{"text": "a b c"}\n\n{"text": "d e f"}\n')
    assert read_lambada(jsonl) == ["a b c", "d e f"]
    plain = tmp_path / "lambada_test_plain_text.txt"
    plain.write_text("a b c\nd e f\n")
    assert read_lambada(plain) == ["a b c", "d e f"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
        (b'{"text": "a b"}\n{"txt": "c d"}\n', "line 2"),
        (b'{"text": "a b"}\n{not json\n', "line 2"),
        (b'{"text": 3}\n', "must be a string"),
        (b"\xff\xfe bad", "not UTF-8"),
    ],
)
def test_malformed_lambada_files_are_named(tmp_path, content, message):
    path = tmp_path / "lambada.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_lambada(path)


def test_missing_file_and_folder_are_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_lambada(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="is a folder"):
        read_lambada(tmp_path)


def test_char_test_split_is_the_last_part_of_the_full_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate.data, "ENWIK8_TEXT8_SIZE", 20)
    monkeypatch.setattr(evaluate.data, "ENWIK8_TEXT8_TEST", 4)
    full = tmp_path / "enwik8"
    full.write_bytes("abcdefghijklmno\u00e9xyz".encode())  # 20 bytes; the last 4 start inside "é"
    assert read_char_test(full, what="enwik8") == "xyz"
    other = tmp_path / "sample"
    other.write_bytes(b"any other size is scored whole")
    assert read_char_test(other, what="enwik8") == "any other size is scored whole"


# --------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-gpt2")
    save_checkpoint(folder, SMALL, random_state_dict(SMALL, seed=0))
    return folder


def run(capsys, *argv):
    status = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_command_lambada_json(small_folder, tmp_path, capsys):
    data = tmp_path / "lambada_test.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(PROSE.split()[i : i + 15])}) + "\n" for i in range(0, 60, 6)))
    status, out, err = run(capsys, "--model", small_folder, "--task", "lambada", "--data", data, "--json", "--quiet")
    assert status == 0 and err == ""
    report = json.loads(out)
    assert report["task"] == "lambada" and report["metrics"]["examples"] == 10
    assert report["model_card"] == {"accuracy": 0.4599, "ppl_word": 35.13}
    status, out, err = run(capsys, "--model", small_folder, "--task", "lambada", "--data", data, "--limit", 3)
    assert status == 0
    assert "45.99" in out and "35.13" in out and "examples=3" in out
    assert "lambada" in err  # the progress bar, on stderr


def test_command_wikitext_reports_canonical_word_perplexity(small_folder, tmp_path, capsys):
    data = tmp_path / "wiki.test.tokens"
    original = " = Title = \n \n The 1 @,@ 000 @-@ year reign ended . \n It was n't long . \n"
    data.write_text(original)
    status, out, _ = run(
        capsys,
        "--model",
        small_folder,
        "--task",
        "wikitext2",
        "--data",
        data,
        "--json",
        "--quiet",
        "--max-length",
        16,
        "--stride",
        8,
    )
    assert status == 0
    metrics = json.loads(out)["metrics"]
    expected = perplexity(
        GPT2.from_pretrained(small_folder), wikitext_detokenize(original), max_length=16, stride=8, progress=False
    )
    assert metrics["words"] == count_words(original, eos_per_line=True) == 17 + 4
    assert metrics["nll"] == pytest.approx(expected["nll"], rel=1e-9)
    assert metrics["ppl_word"] == pytest.approx(math.exp(expected["nll"] * expected["tokens"] / 21), rel=1e-9)
    assert metrics["detokenizer"] == "wikitext" and metrics["stride"] == 8
    status, out, _ = run(
        capsys, "--model", small_folder, "--task", "wikitext103", "--data", data, "--quiet", "--limit", 5
    )
    assert status == 0 and "37.50" in out and "n/a (--limit)" in out


def test_command_enwik8_and_cbt(small_folder, tmp_path, capsys):
    data = tmp_path / "enwik8"
    data.write_text("<page><title>Anarchism</title><text>Anarchism is a political philosophy.</text></page>\n")
    status, out, _ = run(capsys, "--model", small_folder, "--task", "enwik8", "--data", data, "--quiet")
    assert status == 0 and "bits per byte" in out and "1.16" in out
    cbt_file = tmp_path / "cbt.txt"
    cbt_file.write_text(CBT_FILE)
    status, out, _ = run(capsys, "--model", small_folder, "--task", "cbt-ne", "--data", cbt_file, "--json", "--quiet")
    assert status == 0 and json.loads(out)["metrics"]["examples"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "wikitext2"], "needs a data file: pass --data with wikitext-2/wiki.test.tokens"),
        (["--task", "ptb", "--data", "{missing}"], "no such file"),
        (["--task", "ptb", "--data", "{empty}"], "is empty"),
        (["--task", "lambada", "--data", "{bad}"], "line 1"),
        (["--task", "squad"], "invalid choice"),
        (["--task", "ptb", "--data", "{text}", "--stride", "100", "--max-length", "50"], "stride"),
        (["--task", "ptb", "--data", "{text}", "--max-length", "1000"], "max_length <= 64"),
        (["--model", "./no-such-folder", "--task", "ptb"], "no checkpoint folder"),
        ([], "--task"),
    ],
)
def test_command_errors_are_one_line_with_status_2(small_folder, tmp_path, capsys, args, message):
    files = {
        "missing": tmp_path / "missing.txt",
        "empty": tmp_path / "empty.txt",
        "bad": tmp_path / "bad.jsonl",
        "text": tmp_path / "ptb.test.txt",
    }
    files["empty"].write_text("")
    files["bad"].write_text("{oops\n")
    files["text"].write_text(" the cat sat on the mat \n" * 10)
    argv = ["--model", small_folder, "--quiet"] + [a.format(**files) for a in args]
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpt2np eval: error:") and message in err
    assert "Traceback" not in err


def test_command_help(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0 and "--max-length" in out and "--task" in out


# --------------------------------------------------------------------------------------------
# Downloads, against a loopback server


class FileServer:
    """Serves `files` (path -> bytes) on 127.0.0.1; records each requested path."""

    def __init__(self, files):
        self.files, self.requests = files, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):  # a proxy from the environment must not see loopback requests
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    body = "".join(json.dumps({"text": f"passage number {i} ends with word"}) + "\n" for i in range(5)).encode()
    s = FileServer({"/good/lambada_test.jsonl": body, "/bad/lambada_test.jsonl": body[:-3] + b"XX\n"})
    s.body = body
    yield s
    s.close()


def source_for(server, *paths):
    body = server.body
    return evaluate.DataSource(
        "lambada_test.jsonl", hashlib.sha256(body).hexdigest(), len(body), tuple(server.url + p for p in paths)
    )


def test_download_checks_sha256_and_caches(server, tmp_path, capsys):
    source = source_for(server, "/good/lambada_test.jsonl")
    path = evaluate.download(source, cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "lambada_test.jsonl" and path.read_bytes() == server.body
    assert evaluate.download(source, cache_dir=tmp_path, progress=False) == path
    assert server.requests == ["/good/lambada_test.jsonl"]  # the second call read the cache
    assert capsys.readouterr().err == ""  # progress=False: silent
    evaluate.download(dataclasses.replace(source, filename="again.jsonl"), cache_dir=tmp_path, progress=True)
    assert "again.jsonl" in capsys.readouterr().err  # the progress bar, on stderr


def test_download_falls_back_to_the_next_mirror(server, tmp_path):
    source = source_for(server, "/missing/lambada_test.jsonl", "/bad/lambada_test.jsonl", "/good/lambada_test.jsonl")
    path = evaluate.download(source, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == server.body and len(server.requests) == 3


def test_download_never_keeps_a_corrupt_file(server, tmp_path):
    source = source_for(server, "/bad/lambada_test.jsonl", "/missing/lambada_test.jsonl")
    with pytest.raises(OSError, match=r"sha256 mismatch.*404.*pass --data FILE"):
        evaluate.download(source, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    (tmp_path / "lambada_test.jsonl").write_bytes(b"stale")  # a wrong cached copy is replaced
    good = source_for(server, "/good/lambada_test.jsonl")
    assert evaluate.download(good, cache_dir=tmp_path, progress=False).read_bytes() == server.body


def test_command_downloads_lambada_when_no_file_is_given(server, small_folder, tmp_path, capsys, monkeypatch):
    task = dataclasses.replace(evaluate.TASKS["lambada"], source=source_for(server, "/good/lambada_test.jsonl"))
    monkeypatch.setitem(evaluate.TASKS, "lambada", task)
    argv = ["--model", small_folder, "--task", "lambada", "--json", "--quiet", "--cache-dir", tmp_path]
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    report = json.loads(out)
    assert report["data"] == str(tmp_path / "lambada_test.jsonl") and report["metrics"]["examples"] == 5


def test_pinned_lambada_source():
    source = evaluate.LAMBADA_SOURCE
    assert source.sha256 == "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"
    assert source.urls[-1].startswith("https://") and source.size == 1_819_752
    assert "900124bf3b8235c6daf21033af9948b3f07346c4" in source.urls[0]  # a commit, not a branch


# --------------------------------------------------------------------------------------------
# Against transformers, on a random full-size GPT-2 and a real text


def reference_text(tokenizer, n_tokens=2040):
    """English prose from Python's own documentation, cut to about n_tokens tokens (2,040 fit three
    1024-token windows moving by 512, which keeps the test quick)."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics)[:20])
    return tokenizer.decode(tokenizer.encode(text)[:n_tokens])


@pytest.fixture(scope="module")
def full_size(gpt2_pair):
    """conftest.py's full-size pair, with torch's autograd off while this module uses it."""
    torch = pytest.importorskip("torch")
    torch.set_grad_enabled(False)
    yield gpt2_pair
    torch.set_grad_enabled(True)


def torch_perplexity(model, ids, *, max_length, stride):
    """The sliding-window method in torch: labels are -100 for tokens already scored (or context)."""
    import torch
    import torch.nn.functional as F

    step = min(stride, max_length - 1)  # stride == max_length: keep one token of context
    nll, count, begin, scored_to = 0.0, 0, 0, 1
    while scored_to < len(ids):
        end = min(begin + max_length, len(ids))
        input_ids = torch.tensor(ids[begin:end])[None]
        labels = input_ids.clone()
        labels[:, : scored_to - begin] = -100
        hidden = model.transformer(input_ids).last_hidden_state[0, :-1]  # position t predicts token t + 1
        shifted = labels[0, 1:]
        keep = shifted != -100
        logits = model.lm_head(hidden[keep]).double()  # logits only where scored, to keep the test quick
        nll += F.cross_entropy(logits, shifted[keep], reduction="sum").item()
        count += int(keep.sum())
        scored_to, begin = end, begin + step
    return {"nll": nll / count, "ppl": math.exp(nll / count), "tokens": count}


def torch_lambada(model, tokenizer, passages):
    import torch

    hits, nll, tokens = [], [], 0
    for passage in passages:
        context, target = split_last_word(passage)
        ctx, tgt = tokenizer.encode(context), tokenizer.encode(target)
        logits = model(torch.tensor(ctx + tgt)[None]).logits[0, len(ctx) - 1 : -1].double()  # [len(tgt), V]
        log_probs = torch.log_softmax(logits, dim=-1)[torch.arange(len(tgt)), torch.tensor(tgt)]
        hits.append(bool((logits.argmax(-1) == torch.tensor(tgt)).all()))
        nll.append(-float(log_probs.sum()))
        tokens += len(tgt)
    return {
        "accuracy": float(np.mean(hits)),
        "ppl": math.exp(sum(nll) / tokens),
        "ppl_word": math.exp(sum(nll) / len(nll)),
    }


def relative(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("max_length, stride", [(1024, 512), (256, 192), (128, 128)])
def test_perplexity_matches_transformers(full_size, max_length, stride):
    ours, theirs = full_size
    text = reference_text(ours.tokenizer)
    ids = ours.tokenizer.encode(text)
    assert len(ids) >= 2000
    got = perplexity(ours, text, max_length=max_length, stride=stride, progress=False)
    want = torch_perplexity(theirs, ids, max_length=max_length, stride=stride)
    assert got["tokens"] == want["tokens"] == len(ids) - 1
    worst = max(relative(got["ppl"], want["ppl"]), relative(got["nll"], want["nll"]))
    print(
        f"\nperplexity max_length={max_length} stride={stride}: {len(ids)} tokens, ppl {got['ppl']:.6f} vs "
        f"{want['ppl']:.6f}, worst relative difference {worst:.2e}"
    )
    assert worst < 1e-4


def test_lambada_matches_transformers(full_size):
    ours, theirs = full_size
    words = reference_text(ours.tokenizer).split()
    words = [w for w in words if w.isascii()]
    contexts = [" ".join(words[i : i + 30]) for i in range(0, 30 * 18, 30)]
    # Passages ending in the model's own greedy word (one or two tokens), so accuracy is not 0,
    # and passages ending in the text's next word, which a random model misses.
    hits = greedy_examples(ours, contexts[:12], 1) + greedy_examples(ours, contexts[12:18], 2)
    misses = [" ".join(words[i : i + 40]) for i in range(15, 15 + 40 * 8, 40) if words[i + 39].isalpha()]
    passages = hits + misses
    got = lambada(ours, passages, progress=False)
    want = torch_lambada(theirs, ours.tokenizer, passages)
    assert 0 < got["accuracy"] < 1 and got["accuracy"] == want["accuracy"]
    worst = max(relative(got["ppl"], want["ppl"]), relative(got["ppl_word"], want["ppl_word"]))
    print(
        f"\nlambada: {len(passages)} passages, accuracy {got['accuracy']:.4f} vs {want['accuracy']:.4f}, "
        f"ppl {got['ppl']:.4f} vs {want['ppl']:.4f}, worst relative difference {worst:.2e}"
    )
    assert worst < 1e-4


def _uncached_scores(model, context_ids, targets):
    """The old path: every candidate's whole sequence through `score_tokens`."""
    n_ctx = model.config.n_ctx
    sequences = []
    for t in targets:
        ids = (list(context_ids) + list(t))[-n_ctx:]
        sequences.append((ids, len(ids) - len(t)))
    return evaluate.score_tokens(model, sequences, batch_size=3, progress=False)


@settings(max_examples=25, deadline=None)
@given(
    context_len=st.integers(1, 60),
    target_lens=st.lists(st.integers(1, 12), min_size=1, max_size=7),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_cached_continuations_equal_uncached_scoring(small, context_len, target_lens, batch_size, seed):
    # Contexts up to 60 tokens and targets up to 12 in a 64-token model: some candidates fit after
    # the whole context (KV-cached path), others are cut on the left (the score_tokens fallback).
    rng = np.random.default_rng(seed)
    V = small.config.vocab_size
    context_ids = rng.integers(0, V, context_len).tolist()
    targets = [rng.integers(0, V, n).tolist() for n in target_lens]
    (cached,) = evaluate.score_continuations(small, [(context_ids, targets)], batch_size=batch_size, progress=False)
    uncached = _uncached_scores(small, context_ids, targets)
    assert len(cached) == len(uncached) == len(targets)
    for (lp_new, greedy_new), (lp_old, greedy_old), t in zip(cached, uncached, targets):
        assert lp_new.shape == lp_old.shape == (len(t),)
        np.testing.assert_allclose(lp_new, lp_old, rtol=0, atol=1e-4)
        assert (greedy_new == greedy_old).all()  # a target is the argmax with a margin far above rounding
    new_sums, old_sums = [lp.sum() for lp, _ in cached], [lp.sum() for lp, _ in uncached]
    top_two = sorted(old_sums)[-2:]
    if len(top_two) < 2 or top_two[1] - top_two[0] > 1e-3:  # the same choice unless two candidates tie
        assert int(np.argmax(new_sums)) == int(np.argmax(old_sums))


def test_multiple_choice_and_cbt_equal_the_uncached_path(small, tmp_path):
    path = tmp_path / "cbt.txt"
    path.write_text(CBT_FILE)
    examples = read_cbt(path)
    picks = []
    for prepend_eot in (False, True):
        for example in examples:
            context, continuations = cloze_choices(example)
            result = multiple_choice(small, context, continuations, prepend_eot=prepend_eot, progress=False)
            old = [evaluate.methods._continuation(small, context, c, prepend_eot=prepend_eot) for c in continuations]
            old_scores = [float(lp.sum()) for lp, _ in evaluate.score_tokens(small, old, progress=False)]
            np.testing.assert_allclose(result["scores"], old_scores, rtol=0, atol=1e-4)
            assert result["best"] == int(np.argmax(old_scores))
            picks.append(example.candidates[result["best"]] == example.answer)
        result = cbt(small, examples, prepend_eot=prepend_eot, progress=False, batch_size=2)
        assert result["accuracy"] == float(np.mean(picks[-len(examples) :]))


def test_long_context_falls_back_to_the_left_cut(small):
    # A context longer than the model: every candidate is cut on the left, as before.
    context = PROSE
    candidates = [" mat.", " dog and slept.", " roof"]
    result = multiple_choice(small, context, candidates, progress=False)
    old = [evaluate.methods._continuation(small, context, c, prepend_eot=False) for c in candidates]
    assert all(len(ids) == small.config.n_ctx for ids, _ in old)
    old_scores = [float(lp.sum()) for lp, _ in evaluate.score_tokens(small, old, progress=False)]
    np.testing.assert_allclose(result["scores"], old_scores, rtol=0, atol=1e-4)
    assert result["best"] == int(np.argmax(old_scores))
