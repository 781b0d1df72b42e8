"""One Billion Word: per-line perplexity, each line its own document.

Lines scored in batches must equal each line scored alone and plain forward passes; the
detokenizer undoes the benchmark's tokenization; bad input is one line on stderr, exit status 2.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gpt2np import GPT2, GPT2Config
from gpt2np import evaluate
from gpt2np.checkpoint import random_state_dict, save_checkpoint
from gpt2np.evaluate import billion_word_detokenize, line_perplexity, score_lines

SMALL = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_ctx=128)


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


# --------------------------------------------------------------------------------------------
# One Billion Word


def test_billion_word_detokenizer():
    assert billion_word_detokenize("The company 's shares rose 5 % to $ 3.50 , analysts said .") == \
        "The company's shares rose 5% to $3.50, analysts said."
    assert billion_word_detokenize('He said " we do n\'t know " ( really ) .') == 'He said "we don\'t know" (really).'
    assert billion_word_detokenize("I don 't think so : the 10 : 30 train ; see http : / / example.com / a ?") == \
        "I don't think so: the 10:30 train; see http://example.com/a?"
    assert billion_word_detokenize('" Yes , " he said !\nIt costs £ 5 and / or more .') == \
        '"Yes," he said!\nIt costs £5 and/or more.'
    assert billion_word_detokenize("The players ' union said so .") == "The players ' union said so."  # ambiguous: kept


def direct_line_log_probs(model, line, *, eos=True):
    """log p of each token after the first of <|endoftext|> + line (+ <|endoftext|>), one forward pass."""
    eot = model.tokenizer.eot_token
    ids = np.array([eot, *model.tokenizer.encode(line), *([eot] if eos else [])])
    logits = model(ids).astype(np.float64)[:-1]
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    return log_softmax[np.arange(len(ids) - 1), ids[1:]]


LINES = ["The company's shares rose 5%, analysts said.", "Yes.", "He said \"we don't know\" (really).",
         "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
         "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
         "it was the season of Darkness, it was the spring of hope, it was the winter of despair."]


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


ONE_BW = ("The company 's shares rose 5 % , analysts said .\n"
          "\n"
          "He said \" we do n't know \" .\n"
          "Officials declined to comment .\n")


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
# Bad input


@pytest.mark.parametrize(
    "content, args, message",
    [
        ("", [], "is empty"),
        (b"caf\xe9 .\n", [], "is not UTF-8"),
        ("a line .\n", ["--limit", "0"], "limit must be a positive integer"),
    ],
)
def test_command_bad_input_is_one_line_with_status_2(small_folder, tmp_path, capsys, content, args, message):
    data = tmp_path / "data"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    status, out, err = run(capsys, "--model", small_folder, "--task", "1bw", "--data", data, "--quiet", *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpt2np eval: error:") and message in err, err


def test_command_names_the_file_1bw_needs(small_folder, capsys):
    status, _, err = run(capsys, "--model", small_folder, "--task", "1bw", "--quiet")
    assert status == 2 and "news.en.heldout-00000-of-00050" in err
