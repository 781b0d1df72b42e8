"""The two evaluations that generate or score line by line: CNN/DailyMail summaries (ROUGE) and One
Billion Word (per-line perplexity).

A random model writes meaningless summaries, so these tests check the pipeline and the metric,
not the score: ROUGE against overlaps counted by hand on short pairs, summaries reproducible from
the seed whatever the batch size, 1BW lines scored in batches equal to each line scored alone,
and every bad input as one line on stderr with exit status 2.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from gpt2np import GPT2, GPT2Config, evaluate
from gpt2np.checkpoint import random_state_dict, save_checkpoint
from gpt2np.evaluate import (
    MissingExtra,
    billion_word_detokenize,
    line_perplexity,
    read_cnn_dailymail,
    rouge,
    score_lines,
    split_sentences,
    summarize,
    summary_of,
    summary_prompt,
)
from gpt2np.sampling import row_generators

SMALL = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_ctx=128)
STORY = (
    "The city council met on Tuesday. It voted to build a new bridge over the river. "
    "Mr. Smith, the mayor, said the work would start in the spring. Residents welcomed the news. "
)
ARTICLES = [
    {
        "id": f"a{i}",
        "article": STORY * (1 + i % 3) + f"Article number {i}.",
        "highlights": "Council votes for a new bridge .\nWork starts in spring .",
    }
    for i in range(5)
]  # lengths differ, so batches are ragged; article 2 is cut to fit the 128-token context


@pytest.fixture(scope="module")
def small():
    return GPT2.from_random(SMALL, seed=0)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-gpt2-128")
    save_checkpoint(folder, SMALL, random_state_dict(SMALL, seed=0))
    return folder


def run(capsys, *argv):
    status = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------------------------
# ROUGE: rouge-score's values on pairs whose overlaps are counted by hand


def f1(overlap, predicted, reference):
    p, r = overlap / predicted, overlap / reference
    return 2 * p * r / (p + r) if overlap else 0.0


def test_rouge_on_a_pair_counted_by_hand():
    (scores,) = rouge(["the cat sat on the mat"], ["the cat lay on the mat"])
    # unigrams: the x2, cat, on, mat = 5 of 6 each side; bigrams: the-cat, on-the, the-mat = 3 of 5;
    # longest common subsequence: "the cat on the mat", 5 tokens
    assert scores["rouge1"] == pytest.approx(f1(5, 6, 6))
    assert scores["rouge2"] == pytest.approx(f1(3, 5, 5)) == pytest.approx(0.6)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    assert scores["rougeLsum"] == pytest.approx(5 / 6)


def test_rouge_stems_words_longer_than_three_letters():
    # Porter stems: dogs -> dog, running/runs -> run, quickly -> quickli, quick -> quick; "the" and
    # "dog" are not stemmed (3 letters). Overlap: dog, run (2 of 3 and of 4); bigram dog-run (1 of 2, of 3).
    (stemmed,) = rouge(["Dogs running quickly"], ["the dog runs quick"])
    assert stemmed["rouge1"] == pytest.approx(f1(2, 3, 4)) == pytest.approx(4 / 7)
    assert stemmed["rouge2"] == pytest.approx(f1(1, 2, 3)) == pytest.approx(0.4)
    (plain,) = rouge(["Dogs running quickly"], ["the dog runs quick"], use_stemmer=False)
    assert plain["rouge1"] == 0.0


def test_rouge_ignores_case_and_punctuation():
    (scores,) = rouge(["The Cat, sat!"], ["the cat sat"])
    assert all(value == pytest.approx(1.0) for value in scores.values())


def test_rouge_lsum_reads_one_sentence_a_line():
    # Whole texts [a b c d] and [c d a b]: the longest common subsequence is 2 of 4 (ROUGE-L 0.5).
    # Lsum takes, for each reference sentence, the union of its LCS with each summary sentence:
    # "a b" and "c d" on two lines each match 2 tokens of "c d a b", 4 of 4 together (Lsum 1).
    (lines,) = rouge(["a b\nc d"], ["c d a b"])
    assert lines["rougeL"] == pytest.approx(0.5) and lines["rougeLsum"] == pytest.approx(1.0)
    (one_line,) = rouge(["a b c d"], ["c d a b"])  # one sentence: Lsum is ROUGE-L
    assert one_line["rougeLsum"] == pytest.approx(0.5)
    assert summary_of("a b. c d.") == "a b.\nc d."


def test_missing_rouge_score_names_the_extra(small, monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # `import rouge_score` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "gpt2np\[eval\]"'):
        rouge(["a"], ["a"])
    with pytest.raises(MissingExtra):  # before any generation: it fails in a second, not after hours
        summarize(small, [("An article.", "A summary.")], max_new_tokens=4, progress=False)


def test_the_library_never_imports_rouge_score_on_import():
    code = "import sys, gpt2np, gpt2np.evaluate, gpt2np.evaluate.summaries; print('rouge_score' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------------------------
# Sentences and the prompt


@pytest.mark.parametrize(
    "text, sentences",
    [
        ("Hello world. This is it! Is it? Yes", ["Hello world.", "This is it!", "Is it?", "Yes"]),
        ("Mr. Smith went to Washington. He left.", ["Mr. Smith went to Washington.", "He left."]),
        ("The U.S. team won. J. R. Smith cheered.", ["The U.S. team won.", "J. R. Smith cheered."]),
        ('He said "stop." Then he left (quietly.) Done', ['He said "stop."', "Then he left (quietly.)", "Done"]),
        ("Prices rose 3.5 percent. Good", ["Prices rose 3.5 percent.", "Good"]),
        (" First line\n\nsecond line without a stop \n", ["First line", "second line without a stop"]),
        ("", []),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_summary_keeps_the_first_sentences():
    generated = " The bridge will be built. Work starts in spring. The mayor is happy. Nobody else is"
    assert summary_of(generated) == "The bridge will be built.\nWork starts in spring.\nThe mayor is happy."
    assert summary_of(generated, sentences=1) == "The bridge will be built."
    assert summary_of(" Only one unfinished") == "Only one unfinished"


def test_prompt_keeps_the_beginning_so_that_the_new_tokens_fit(small):
    tokenizer = small.tokenizer
    suffix = tokenizer.encode("\nTL;DR:")
    article = tokenizer.encode(STORY * 3)
    assert len(article) + len(suffix) > 100
    ids, cut = summary_prompt(tokenizer, STORY * 3, suffix, room=100)
    assert cut and len(ids) == 100 and ids == article[: 100 - len(suffix)] + suffix
    ids, cut = summary_prompt(tokenizer, STORY * 3, suffix, room=100, truncation="keep_end")
    assert cut and ids == article[len(article) - 100 + len(suffix) :] + suffix
    ids, cut = summary_prompt(tokenizer, "Short.", suffix, room=100)
    assert not cut and ids == tokenizer.encode("Short.") + suffix


# --------------------------------------------------------------------------------------------
# The summarisation task


def pairs(records):
    return [(r["article"], r["highlights"]) for r in records]


def test_summaries_are_the_seeded_generation_whatever_the_batch(small):
    options = dict(max_new_tokens=12, seed=7, progress=False)
    one = summarize(small, pairs(ARTICLES), batch_size=1, **options)
    three = summarize(small, pairs(ARTICLES), batch_size=3, **options)
    assert [a["generated"] for a in one["articles"]] == [a["generated"] for a in three["articles"]]
    assert {k: one[k] for k in evaluate.ROUGE_TYPES} == {k: three[k] for k in evaluate.ROUGE_TYPES}
    # Article i draws from the seed's i-th child: exactly what one generate call over every article gives.
    prompts = [
        summary_prompt(small.tokenizer, a, small.tokenizer.encode("\nTL;DR:"), room=128 - 12)[0]
        for a, _ in pairs(ARTICLES)
    ]
    ids = small.generate_ids(prompts, max_new_tokens=12, top_k=2, temperature=1.0, seed=7)
    assert [a["generated"] for a in one["articles"]] == [small.tokenizer.decode(i) for i in ids]
    # --limit keeps the first articles' summaries as they were.
    two = summarize(small, pairs(ARTICLES)[:2], batch_size=2, **options)
    assert [a["generated"] for a in two["articles"]] == [a["generated"] for a in one["articles"][:2]]
    other = summarize(small, pairs(ARTICLES), batch_size=2, **options | {"seed": 8})
    assert [a["generated"] for a in other["articles"]] != [a["generated"] for a in one["articles"]]


def test_summarize_reports_the_method_and_each_article(small):
    result = summarize(small, pairs(ARTICLES), max_new_tokens=12, seed=0, progress=False)
    assert {
        key: result[key]
        for key in (
            "suffix",
            "top_k",
            "temperature",
            "max_new_tokens",
            "sentences",
            "seed",
            "truncation",
            "use_stemmer",
        )
    } == {
        "suffix": "\nTL;DR:",
        "top_k": 2,
        "temperature": 1.0,
        "max_new_tokens": 12,
        "sentences": 3,
        "seed": 0,
        "truncation": "keep_start",
        "use_stemmer": True,
    }
    articles = result["articles"]
    assert result["examples"] == len(articles) == 5
    assert result["tokens"] == sum(a["new_tokens"] for a in articles) <= 5 * 12
    assert result["truncated"] == sum(a["truncated"] for a in articles) >= 1
    assert all(a["prompt_tokens"] <= 128 - 12 for a in articles)
    for article in articles:
        assert article["summary"] == summary_of(article["generated"])
        (again,) = rouge([article["summary"]], [article["highlights"]])  # anyone can recompute the metric
        assert again == {key: article[key] for key in evaluate.ROUGE_TYPES}
    for key in evaluate.ROUGE_TYPES:
        assert result[key] == pytest.approx(np.mean([a[key] for a in articles]))


def test_summarize_errors(small):
    with pytest.raises(ValueError, match=r"128-token context"):
        summarize(small, pairs(ARTICLES), max_new_tokens=125, progress=False)
    with pytest.raises(ValueError, match="sentences must be"):
        summarize(small, pairs(ARTICLES), sentences=0, progress=False)
    with pytest.raises(ValueError, match="truncation must be one of keep_start, keep_end"):
        summarize(small, pairs(ARTICLES), truncation="middle", progress=False)
    with pytest.raises(ValueError, match="no articles"):
        summarize(small, [], progress=False)


# --------------------------------------------------------------------------------------------
# Data files


def write_csv(path, records, fields=("id", "article", "highlights")):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    path.write_text(buffer.getvalue(), newline="")
    return path


def test_read_cnn_dailymail_jsonl_and_csv(tmp_path):
    from_json = read_cnn_dailymail(write_jsonl(tmp_path / "test.jsonl", ARTICLES))
    from_csv = read_cnn_dailymail(write_csv(tmp_path / "test.csv", ARTICLES))  # highlights hold newlines
    assert from_json == from_csv == [(r["article"], r["highlights"]) for r in ARTICLES]
    assert from_csv[0].highlights == "Council votes for a new bridge .\nWork starts in spring ."


# --------------------------------------------------------------------------------------------
# One Billion Word


def test_billion_word_detokenizer():
    assert (
        billion_word_detokenize("The company 's shares rose 5 % to $ 3.50 , analysts said .")
        == "The company's shares rose 5% to $3.50, analysts said."
    )
    assert billion_word_detokenize('He said " we do n\'t know " ( really ) .') == 'He said "we don\'t know" (really).'
    assert (
        billion_word_detokenize("I don 't think so : the 10 : 30 train ; see http : / / example.com / a ?")
        == "I don't think so: the 10:30 train; see http://example.com/a?"
    )
    assert (
        billion_word_detokenize('" Yes , " he said !\nIt costs £ 5 and / or more .')
        == '"Yes," he said!\nIt costs £5 and/or more.'
    )
    assert billion_word_detokenize("The players ' union said so .") == "The players ' union said so."  # ambiguous: kept


def direct_line_log_probs(model, line, *, eos=True):
    """log p of each token after the first of <|endoftext|> + line (+ <|endoftext|>), one forward pass."""
    eot = model.tokenizer.eot_token
    ids = np.array([eot, *model.tokenizer.encode(line), *([eot] if eos else [])])
    logits = model(ids).astype(np.float64)[:-1]
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    return log_softmax[np.arange(len(ids) - 1), ids[1:]]


LINES = [
    "The company's shares rose 5%, analysts said.",
    "Yes.",
    'He said "we don\'t know" (really).',
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair.",
]


def test_lines_scored_in_batches_equal_each_line_scored_alone(small):
    batched = score_lines(small, LINES, batch_size=3, progress=False)
    for line, log_probs in zip(LINES, batched):
        (alone,) = score_lines(small, [line], progress=False)
        np.testing.assert_allclose(log_probs, alone, rtol=0, atol=1e-6)
        if len(log_probs) < 128:  # one window: the same as one plain forward pass
            np.testing.assert_allclose(log_probs, direct_line_log_probs(small, line), rtol=0, atol=1e-6)
    assert len(small.tokenizer.encode(LINES[-1])) + 1 > 64  # the long line runs in sliding windows at 64
    windows = score_lines(small, LINES, max_length=64, stride=32, batch_size=2, progress=False)
    assert [len(w) for w in windows] == [len(b) for b in batched]
    (no_eos,) = score_lines(small, ["Yes."], eos=False, progress=False)
    np.testing.assert_allclose(no_eos, direct_line_log_probs(small, "Yes.", eos=False), atol=1e-6)


def test_line_perplexity_per_token_and_per_word(small):
    result = line_perplexity(small, LINES[:3], words=20, progress=False)
    log_probs = np.concatenate([direct_line_log_probs(small, line) for line in LINES[:3]])
    assert result["tokens"] == len(log_probs) and result["lines"] == 3
    assert result["nll"] == pytest.approx(-log_probs.mean(), rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(-log_probs.mean()), rel=1e-6)
    assert result["ppl_word"] == pytest.approx(math.exp(-log_probs.sum() / 20), rel=1e-6)
    assert result["eos"] is True and result["prepend_eot"] is True


ONE_BW = (
    "The company 's shares rose 5 % , analysts said .\n"
    "\n"
    'He said " we do n\'t know " .\n'
    "Officials declined to comment .\n"
)


def test_command_1bw(small_folder, tmp_path, capsys):
    data = tmp_path / "news.en.heldout-00000-of-00050"
    data.write_text(ONE_BW)
    status, out, err = run(capsys, "--model", small_folder, "--task", "1bw", "--data", data, "--json", "--quiet")
    assert status == 0 and err == ""
    report = json.loads(out)
    metrics = report["metrics"]
    assert report["model_card"] == {"ppl_word": 75.20}
    assert metrics["lines"] == 3 and metrics["words"] == 11 + 9 + 5 + 3  # the words and one </S> a line
    model = GPT2.from_pretrained(small_folder)
    lines = [billion_word_detokenize(line) for line in ONE_BW.splitlines() if line]
    nll = -sum(direct_line_log_probs(model, line).sum() for line in lines)
    assert metrics["ppl_word"] == pytest.approx(math.exp(nll / 28), rel=1e-6)
    assert metrics["detokenizer"] == "1bw"
    status, out, err = run(capsys, "--model", small_folder, "--task", "1bw", "--data", data, "--limit", 2)
    assert status == 0 and "75.20" in out and "ppl (per token)" in out and "lines=2" in out
    assert "<|endoftext|> + line + <|endoftext|>" in out  # the method, stated
    assert "lines" in err  # the progress bar


# --------------------------------------------------------------------------------------------
# The command


def test_command_cnn_dailymail_json_and_table(small_folder, tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", ARTICLES)
    argv = ["--model", small_folder, "--task", "cnn_dailymail", "--data", data, "--max-new-tokens", 12]
    status, out, err = run(capsys, *argv, "--json", "--quiet", "--batch-size", 2)
    assert status == 0 and err == ""
    report = json.loads(out)
    assert report["model_card"] == {}
    assert report["paper"]["GPT-2 1.5B, TL;DR: (paper)"] == {"rouge1": 0.2934, "rouge2": 0.0827, "rougeL": 0.2658}
    assert report["paper"]["random 3 sentences (paper)"] == {"rouge1": 0.2878, "rouge2": 0.0863, "rougeL": 0.2552}
    assert report["metrics"]["examples"] == 5 and report["metrics"]["seed"] == 0
    assert [set(a) >= {"summary", "generated", "rouge1", "rouge2", "rougeL", "rougeLsum"} for a in report["articles"]]
    status, again, _ = run(capsys, *argv, "--json", "--quiet", "--batch-size", 5)
    assert json.loads(again)["articles"] == report["articles"]  # same seed, other batch size: same summaries
    csv_data = write_csv(tmp_path / "test.csv", ARTICLES)
    status, out, err = run(
        capsys,
        *argv[:-4],
        "--data",
        csv_data,
        *argv[-2:],
        "--limit",
        2,
        "--top-k",
        3,
        "--sentences",
        1,
        "--seed",
        3,
        "--suffix",
        "\\nSummary:",
    )
    assert status == 0
    assert "29.34" in out and "28.78" in out and "GPT-2 1.5B" in out and "random 3 sentences (paper)" in out
    assert "suffix='\\nSummary:'" in out and "top_k=3" in out and "sentences=1" in out and "seed=3" in out
    assert "examples=2" in out
    assert "article" in err and "tok/s" in err  # the progress bar, on stderr


ONE_ARTICLE = '{"article": "a", "highlights": "b"}\n'


@pytest.mark.parametrize(
    "task, content, args, message",
    [
        (
            "cnn_dailymail",
            '{"text": "an article"}\n',
            [],
            "line 1: expected the fields 'article' and 'highlights' (the columns of cnn_dailymail 3.0.0), got 'text'",
        ),
        ("cnn_dailymail", "id,text\n1,an article\n", [], "expected the columns 'article' and 'highlights'"),
        ("cnn_dailymail", '{"article": "x", "highlights": ""}\n', [], "'highlights' must be a non-empty string"),
        ("cnn_dailymail", "{oops\n", [], "line 1: expected a JSON object"),
        ("cnn_dailymail", "", [], "is empty"),
        ("cnn_dailymail", b"article,highlights\n\xff\xfe,x\n", [], "is not UTF-8"),
        ("cnn_dailymail", ONE_ARTICLE, ["--limit", "0"], "limit must be a positive integer"),
        ("cnn_dailymail", ONE_ARTICLE, ["--max-new-tokens", "200"], "128-token context"),
        ("1bw", "", [], "is empty"),
        ("1bw", b"caf\xe9 .\n", [], "is not UTF-8"),
        ("1bw", "a line .\n", ["--limit", "0"], "limit must be a positive integer"),
        ("1bw", "a line .\n", ["--top-k", "3"], "top_k: options of the cnn_dailymail task only"),
    ],
)
def test_command_bad_input_is_one_line_with_status_2(small_folder, tmp_path, capsys, task, content, args, message):
    data = tmp_path / "data"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    status, out, err = run(capsys, "--model", small_folder, "--task", task, "--data", data, "--quiet", *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpt2np eval: error:") and message in err, err


def test_command_without_rouge_score_names_the_extra(small_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    data = write_jsonl(tmp_path / "test.jsonl", ARTICLES)
    status, out, err = run(capsys, "--model", small_folder, "--task", "cnn_dailymail", "--data", data, "--quiet")
    assert status == 2 and out == "" and err.count("\n") == 1
    assert 'pip install "gpt2np[eval]"' in err


def test_command_names_the_file_each_task_needs(small_folder, capsys):
    status, _, err = run(capsys, "--model", small_folder, "--task", "cnn_dailymail", "--quiet")
    assert status == 2 and "'article' and 'highlights'" in err
    status, _, err = run(capsys, "--model", small_folder, "--task", "1bw", "--quiet")
    assert status == 2 and "news.en.heldout-00000-of-00050" in err


def test_draws_follow_row_generators():
    """The seed rule the docs state: article i's generator is row_generators(seed, n)[i], for any n > i."""
    first = [g.integers(1 << 30) for g in row_generators(5, 3)]
    assert first == [g.integers(1 << 30) for g in row_generators(5, 7)][:3]
