"""GPT-2's byte-level BPE tokenizer.

GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners", section 2.2)
runs byte-pair encoding on the UTF-8 *bytes* of the text, so any string can be encoded and no
token is ever unknown. Encoding has three stages, each with a named variable in `encode`:

1. pre-tokenise: a regular expression cuts the text into words (`GPT2_PATTERN`); merges never
   cross a word boundary;
2. translate: each word's UTF-8 bytes become printable characters (`bytes_to_unicode`), the
   alphabet the vocabulary files are written in;
3. merge: adjacent symbols are merged, lowest merge rank first, until no ranked pair is left
   (`Tokenizer._merge`); the resulting symbols are looked up in the vocabulary.

The vocabulary is OpenAI's (`encoder.json` + `vocab.bpe`, bundled in `gpt2np/vocab/`, identical to
the hub's `vocab.json` + `merges.txt`).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import numbers
import os
from collections.abc import Collection, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import AbstractSet, Literal

import regex

ENDOFTEXT = "<|endoftext|>"

# The pre-tokenisation pattern, alternative by alternative:
#   's|'t|'re|'ve|'m|'ll|'d   English contractions, lower case only (so "DON'T" splits as DON ' T)
#    ?\p{L}+                   a run of letters, with at most one leading space
#    ?\p{N}+                   a run of digits (any script), with at most one leading space
#    ?[^\s\p{L}\p{N}]+         a run of punctuation/symbols, with at most one leading space
#   \s+(?!\S)                  whitespace, leaving its last character to lead the next word
#   \s+                        whitespace at the end of the text
# The lookahead is why "a   b" becomes ["a", "  ", " b"]: the space before a word stays with it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Words whose merged form is remembered. The cache is cleared when it passes either limit: entries, or
# bytes (each word's UTF-8 bytes plus an 8-byte list slot per id). Prose and source code average about
# 22 such bytes a word, so full of ordinary words the cache holds about 2 MB and the byte limit never
# bites. Words longer than _CACHE_WORD_BYTES are never cached: text repeats short words, and a giant
# word would hold its memory until the next clear.
_CACHE_LIMIT = 100_000
_CACHE_BYTES = 8 << 20
_CACHE_WORD_BYTES = 256

# sha256 of OpenAI's encoder.json and vocab.bpe (the hub's gpt2 vocab.json and merges.txt): the files
# for which the whole-word shortcut is proven (see `Tokenizer._encode_word`).
OPENAI_SHA256 = (
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
)


def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable unicode character.

    The vocabulary files are text, and BPE must not see whitespace or control characters
    (they would clash with the file format). So the 188 bytes that are already printable
    Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, and the other 68
    bytes (controls, space, 0x7F-0xA0, 0xAD) are shifted to code points 256, 257, ... in byte
    order. A space (0x20) is therefore 'Ġ' (U+0120) and a newline (0x0A) is 'Ċ' (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def is_openai_vocabulary(vocab: str | os.PathLike, merges: str | os.PathLike) -> bool:
    """Whether the two files are OpenAI's GPT-2 vocabulary, byte for byte (about 2 ms to hash)."""
    digests = tuple(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (vocab, merges))
    return digests == OPENAI_SHA256


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Read `encoder.json` / `vocab.json`: a JSON object mapping token strings to ids."""
    try:
        with open(path, encoding="utf-8") as f:
            encoder = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the vocabulary {os.fspath(path)!r}: {e}") from e
    if not isinstance(encoder, dict) or not all(type(i) is int for i in encoder.values()):
        raise ValueError(f"{os.fspath(path)!r} is not a JSON object mapping tokens to integer ids")
    return encoder


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read `vocab.bpe` / `merges.txt`: a `#version` line, then one merge a line, rank order."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the merges file {os.fspath(path)!r}: {e}") from e
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{os.fspath(path)!r} line {n}: expected two symbols separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


class Tokenizer:
    """GPT-2's tokenizer: `encode(text) -> ids` and `decode(ids) -> text`, as tiktoken's "gpt2".

    `Tokenizer()` loads the bundled vocabulary; `Tokenizer.from_files(vocab, merges)` loads any
    GPT-2-style pair (the hub's `vocab.json` + `merges.txt`, or OpenAI's `encoder.json` + `vocab.bpe`).
    """

    def __init__(self, encoder: dict[str, int] | None = None, merges: Sequence[tuple[str, str]] | None = None):
        if encoder is None and merges is None:  # `Tokenizer()`: the bundled GPT-2 vocabulary
            folder = resources.files("gpt2np") / "vocab"
            with resources.as_file(folder / "encoder.json") as v, resources.as_file(folder / "vocab.bpe") as m:
                encoder, merges, proven = read_vocab(v), read_merges(m), is_openai_vocabulary(v, m)
        elif encoder is None or merges is None:
            raise ValueError("pass both encoder and merges, or neither for the bundled GPT-2 vocabulary")
        else:
            proven = False
        # Whether a word that is a whole vocabulary entry may skip the merges (see `_encode_word`).
        self._whole_word_shortcut = proven
        self.encoder = dict(encoder)
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        byte_encoder = bytes_to_unicode()
        byte_decoder = {ch: b for b, ch in byte_encoder.items()}
        # str.translate table: a Latin-1 character (one per byte) -> its printable stand-in.
        self._translate = {b: ch for b, ch in byte_encoder.items()}
        self.special_tokens = {ENDOFTEXT: self.encoder[ENDOFTEXT]} if ENDOFTEXT in self.encoder else {}
        # Every id's raw bytes, for decoding; special tokens decode to their own text.
        self._token_bytes: list[bytes] = [b""] * (max(self.encoder.values()) + 1)
        untranslate = {ord(ch): b for ch, b in byte_decoder.items()}  # stand-in -> Latin-1 char
        for token, i in self.encoder.items():
            if token in self.special_tokens:
                self._token_bytes[i] = token.encode("utf-8")
            else:
                self._token_bytes[i] = token.translate(untranslate).encode("latin-1")
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, list[int]] = {}
        self._cache_bytes = 0  # the cache's size as the limits above count it

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_files(cls, vocab: str | os.PathLike, merges: str | os.PathLike) -> "Tokenizer":
        """Load a GPT-2-style vocabulary: a JSON token -> id map and a merges file (one pair a line)."""
        tokenizer = cls(read_vocab(vocab), read_merges(merges))
        tokenizer._whole_word_shortcut = is_openai_vocabulary(vocab, merges)
        return tokenizer

    # ------------------------------------------------------------------ properties
    @property
    def n_vocab(self) -> int:
        """Number of token ids (50,257 for GPT-2: 256 bytes + 50,000 merges + <|endoftext|>)."""
        return len(self._token_bytes)

    @property
    def eot_token(self) -> int:
        """The id of <|endoftext|> (50256 for GPT-2)."""
        return self.special_tokens[ENDOFTEXT]

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Encode `text` to token ids, with tiktoken's handling of special tokens.

        Text that spells a special token (`<|endoftext|>`) raises `ValueError` unless it is in
        `allowed_special` (then it becomes the special id) or not in `disallowed_special` (then it
        is encoded as ordinary text). `allowed_special="all"` allows every special token;
        `disallowed_special=()` turns the check off.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(
                f"allowed_special names unknown special tokens {sorted(unknown)}; known: {sorted(self.special_tokens)}"
            )
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        for token in disallowed:
            if token in text:
                raise ValueError(
                    f"the text contains the special token {token!r}. Pass allowed_special={{{token!r}}} "
                    f"(or allowed_special='all') to encode it as the special token, or "
                    f"disallowed_special=() to encode it as ordinary text."
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        special = regex.compile("|".join(regex.escape(t) for t in sorted(allowed, key=len, reverse=True)))
        start = 0
        for match in special.finditer(text):
            ids += self.encode_ordinary(text[start : match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` treating special-token text as ordinary text."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates cannot be UTF-8: replace them, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        words = self._pattern.findall(text)  # stage 1: pre-tokenise
        ids: list[int] = []
        cache = self._cache
        for word in words:
            cached = cache.get(word)
            if cached is None:
                cached = self._encode_word(word)
            ids += cached
        return ids

    def _encode_word(self, word: str) -> list[int]:
        """Translate and merge one word (stages 2 and 3), and remember its ids if it is short.

        Most words are a single vocabulary entry, and skipping their merges speeds up a cold encode.
        That shortcut is BPE only if every entry's merges rebuild it. OpenAI's files are proven to
        (tests/test_tokenizer.py checks all 50,256 entries) and are recognised by their sha256;
        checking another vocabulary at load would cost about 0.35 s, so it always runs the merges.
        With vocab {"a", "b", "ab"} and no merges, "ab" is then [a, b], as OpenAI's encoder.py gives.
        """
        # stage 2: UTF-8 bytes -> printable stand-ins ('Ġ' for a space, ...)
        translated = word.encode("utf-8").decode("latin-1").translate(self._translate)
        if self._whole_word_shortcut and translated in self.encoder:
            ids = [self.encoder[translated]]
        else:
            ids = [self.encoder[symbol] for symbol in self._merge(list(translated))]  # stage 3: BPE merges
        if len(translated) <= _CACHE_WORD_BYTES:
            self._remember(word, ids, len(translated) + 8 * len(ids))
        return ids

    def _remember(self, word: str, ids: list[int], size: int) -> None:
        """Cache a word's ids, first emptying the cache if it would pass its entry or byte limit."""
        if len(self._cache) >= _CACHE_LIMIT or self._cache_bytes + size > _CACHE_BYTES:
            self._cache.clear()
            self._cache_bytes = 0
        self._cache[word] = ids
        self._cache_bytes += size

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply the BPE merges to one word's symbols, lowest rank first, leftmost first on ties.

        The textbook loop rescans every pair after each merge, which is quadratic in the word's
        length (a 3,000-letter word takes seconds). Here the candidate pairs wait in a heap keyed
        by (rank, position), and the symbols form a linked list, so each merge costs O(log n).
        A heap entry can go stale when a neighbour merged first; it is skipped when popped by
        checking that the pair at that position still has the same rank. Merging a pair only
        creates pairs of higher rank (a merged symbol exists only after its own merge), so this
        order produces exactly the textbook result.
        """
        ranks = self.bpe_ranks
        n = len(symbols)
        nxt = list(range(1, n + 1))  # index of the next live symbol (n: none)
        prv = list(range(-1, n - 1))  # index of the previous live symbol (-1: none)
        heap = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if j >= n or symbols[i] is None or ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: one of the two symbols has merged with something else
            symbols[i] += symbols[j]
            symbols[j] = None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            for a in (prv[i], i):  # the new pairs on each side of the merged symbol
                if a >= 0 and nxt[a] < n:
                    rank = ranks.get((symbols[a], symbols[nxt[a]]))
                    if rank is not None:
                        heapq.heappush(heap, (rank, a))
        return [s for s in symbols if s is not None]

    # ------------------------------------------------------------------ decode
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of a sequence of ids (may end in the middle of a UTF-8 character)."""
        token_bytes = self._token_bytes
        ids = ids if isinstance(ids, list) else list(ids)
        try:
            if not ids or min(ids) >= 0:
                return b"".join([token_bytes[i] for i in ids])
        except (IndexError, TypeError):
            pass
        bad = [i for i in ids if not isinstance(i, numbers.Integral) or not 0 <= i < len(token_bytes)]
        raise ValueError(f"token ids must be integers in [0, {len(token_bytes)}); got {bad[:5]}")

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (for streaming: join bytes, then decode)."""
        return self.decode_bytes([token])

    def mergeable_ranks(self) -> dict[bytes, int]:
        """Each ordinary token's bytes -> its id (its merge rank): the table tiktoken's Encoding takes."""
        return {self._token_bytes[i]: i for i in self.encoder.values() if i not in self.special_tokens.values()}

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, merges={len(self.bpe_ranks)})"
