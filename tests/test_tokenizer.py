"""The tokenizer against GPT-2's own encoding (tiktoken as the oracle) and its own invariants."""

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2np import Tokenizer
from gpt2np.reference import bpe_merge
from gpt2np.tokenizer import GPT2_PATTERN, bytes_to_unicode

VOCAB = resources.files("gpt2np") / "vocab"

# The hashes OpenAI's files are pinned to (shared/gpt2-vocab/SHA256SUMS; tiktoken pins the same).
PINNED_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

EDGE_CASES = [
    "Hello there       dear",
    "DON'T you dare, I'LL see. We're here; they've gone; it's 'quoted' isn't it",
    "line one\r\nline two\r\n\r\n",
    "\tindented\n\t\tdeeper\v\fvertical",
    "non\u00a0breaking and zero\u200bwidth and\u2003em space",
    "e\u0301 n\u0303 combining a\u030a\u0308",
    "日本語のテキストと中文文本，还有한국어",
    "family 👨‍👩‍👧‍👦 flags 🇺🇸🇯🇵 skin 👍🏽 keycap 1️⃣",
    "digits ١٢٣ ४५६ ໑໒ 12345678901234567890",
    "a" * 3000,
    " " * 500,
    "<|endoftext|> as plain text",
    "",
    " ",
    "\n",
    "'s's 's 'S ''",
    "x = {'a': [1, 2.5e-3], \"b\": None}  # comment\n",
]


def stdlib_source(min_bytes: int = 400_000) -> str:
    """Real Python source code: stdlib modules concatenated until `min_bytes`."""
    root = Path(json.__file__).parent.parent
    parts, size = [], 0
    for name in [
        "argparse.py",
        "ast.py",
        "collections/__init__.py",
        "dataclasses.py",
        "difflib.py",
        "email/_header_value_parser.py",
        "inspect.py",
        "pathlib.py",
        "pydoc.py",
        "typing.py",
    ]:
        text = (root / name).read_text(encoding="utf-8")
        parts.append(text)
        size += len(text.encode())
        if size >= min_bytes:
            break
    return "".join(parts)


def stdlib_prose() -> str:
    """Real English prose: the Python reference manual's topics shipped with CPython (~460 KB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def reference():
    """tiktoken's GPT-2 encoding, built from the bundled files (no download)."""
    tiktoken = pytest.importorskip("tiktoken")
    byte_decoder = {ch: b for b, ch in bytes_to_unicode().items()}
    encoder = json.loads((VOCAB / "encoder.json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_decoder[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    return tiktoken.Encoding(
        name="gpt2-bundled", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def test_bundled_vocabulary_is_openais():
    for name, digest in PINNED_SHA256.items():
        assert hashlib.sha256((VOCAB / name).read_bytes()).hexdigest() == digest, name


def test_golden_ids(tok):
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode(" hello") == [23748]
    assert tok.n_vocab == 50257
    assert tok.eot_token == 50256
    assert tok.decode([31373, 995]) == "hello world"


def test_special_tokens(tok):
    text = "a<|endoftext|>b"
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode(text)
    assert tok.encode(text, allowed_special="all") == [64, 50256, 65]
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    plain = tok.encode(text, disallowed_special=())
    assert 50256 not in plain and tok.decode(plain) == text
    assert tok.decode([50256]) == "<|endoftext|>"
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("x", allowed_special={"<|fim|>"})


def test_decode_replaces_partial_characters(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1, "the emoji spans several tokens"
    assert tok.decode(ids[:1]) == "\ufffd"
    assert b"".join(tok.decode_single_token_bytes(i) for i in ids).decode() == "😀"
    assert tok.decode_bytes(ids) == "😀".encode()


def test_bad_input(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    for bad in ([50257], [-1], ["a"]):
        with pytest.raises(ValueError, match="token ids"):
            tok.decode(bad)


@pytest.mark.parametrize("text", EDGE_CASES, ids=lambda t: repr(t[:20]))
def test_edge_cases_match_reference_and_round_trip(tok, reference, text):
    ids = tok.encode(text, disallowed_special=())
    assert ids == reference.encode(text, disallowed_special=())
    assert tok.decode(ids) == text


def test_edge_cases_round_trip_without_reference(tok):
    for text in EDGE_CASES:
        assert tok.decode(tok.encode(text, disallowed_special=())) == text
    # Golden ids as tiktoken gives them: six single spaces, the seventh leads " dear".
    assert tok.encode("Hello there       dear") == [15496, 612, 220, 220, 220, 220, 220, 220, 13674]
    assert tok.encode("DON'T") == [41173, 6, 51]


@pytest.mark.parametrize("corpus", [stdlib_prose, stdlib_source], ids=["prose", "source"])
def test_large_real_text_matches_reference(reference, corpus):
    text = corpus()
    assert len(text.encode()) >= 400_000
    ours = Tokenizer().encode(text, disallowed_special=())
    theirs = reference.encode(text, disallowed_special=())
    assert len(ours) == len(theirs)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert first is None, f"first difference at token {first}: {ours[first : first + 5]} vs {theirs[first : first + 5]}"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("aabeeilnorsst Ġ"), min_size=1, max_size=60))
def test_heap_merge_equals_textbook_merge(tok, word):
    assert tok._merge(list(word)) == bpe_merge(word, tok.bpe_ranks)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text, disallowed_special=())) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_unicode_matches_reference(tok, reference, text):
    assert tok.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())


def test_lone_surrogates_are_replaced(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_from_files_hub_names(tmp_path, tok):
    shutil.copy(VOCAB / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(VOCAB / "vocab.bpe", tmp_path / "merges.txt")
    other = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    text = stdlib_prose()[:20_000]
    assert other.encode(text) == tok.encode(text)


def test_from_files_errors_name_the_file(tmp_path):
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_files(tmp_path / "vocab.json", VOCAB / "vocab.bpe")
    with pytest.raises(ValueError, match="merges.txt' line 2"):
        Tokenizer.from_files(VOCAB / "encoder.json", tmp_path / "merges.txt")
    with pytest.raises(ValueError, match="missing"):
        Tokenizer.from_files(tmp_path / "missing.json", VOCAB / "vocab.bpe")


# ------------------------------------------------------------------------------- the whole-word shortcut
TINY_VOCAB = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}


def test_every_bundled_entry_merges_to_itself(tok):
    """The proof behind the whole-word shortcut: with OpenAI's files, BPE turns each entry into itself."""
    unreachable = [t for t in tok.encoder if t not in tok.special_tokens and tok._merge(list(t)) != [t]]
    assert unreachable == []
    assert tok._whole_word_shortcut


def test_custom_vocabulary_runs_the_merges(tmp_path):
    """ "ab" is an entry, but no merge builds it: BPE (OpenAI's encoder.py, HF's tokenizer) gives [a, b]."""
    (tmp_path / "vocab.json").write_text(json.dumps(TINY_VOCAB))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tiny = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert tiny.encode("ab") == [0, 1]
    assert tiny.encode("ab") == [0, 1]  # from the cache
    assert Tokenizer(TINY_VOCAB, []).encode("abab") == [0, 1, 0, 1]
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    assert Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt").encode("ab") == [2]


def test_shortcut_needs_openais_files_byte_for_byte(tmp_path):
    shutil.copy(VOCAB / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(VOCAB / "vocab.bpe", tmp_path / "merges.txt")
    assert Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")._whole_word_shortcut
    with open(tmp_path / "merges.txt", "a") as f:
        f.write("\n")  # the same merges, other bytes: not proven, so the merges run
    other = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert not other._whole_word_shortcut
    text = stdlib_prose()[:5_000]
    assert other.encode(text) == Tokenizer().encode(text)


# ------------------------------------------------------------------------------- the word cache
def cache_size(tokenizer: Tokenizer) -> int:
    """The cache's size as its byte limit counts it, recomputed from its contents."""
    return sum(len(word.encode()) + 8 * len(ids) for word, ids in tokenizer._cache.items())


def test_cache_stays_under_its_byte_limit_with_giant_words():
    from gpt2np import tokenizer as module

    tiny = Tokenizer(TINY_VOCAB, [])  # no merges: a 100 KB word encodes in milliseconds
    for i in range(100):  # 10 MB of distinct words
        word = format(i, "07b").replace("0", "a").replace("1", "b") + "a" * 100_000
        assert tiny.encode(word)[:7] == [int(bit) for bit in format(i, "07b")]
    assert cache_size(tiny) < 900_000  # less than one of the words: each is 100 KB + 800 KB of id slots
    assert cache_size(tiny) == tiny._cache_bytes <= module._CACHE_BYTES


def test_cache_clears_at_its_byte_limit(monkeypatch, tok):
    from gpt2np import tokenizer as module

    monkeypatch.setattr(module, "_CACHE_BYTES", 2_000)
    fresh = Tokenizer()
    words = [f" word{i}" for i in range(1_000)]
    for word in words:
        fresh.encode(word)
        assert cache_size(fresh) == fresh._cache_bytes <= 2_000
    assert 0 < len(fresh._cache) < 1_000
    assert [fresh.encode(w) for w in words] == [tok.encode(w) for w in words]
