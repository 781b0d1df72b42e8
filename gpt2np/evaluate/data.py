"""The evaluation data: reading the test files, undoing their word-level tokenization, and
fetching the one file gpt2np can pin by checksum (LAMBADA) through gpt2np.download."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..download import cached_download, endpoint

# enwik8 and text8 are 100,000,000 bytes; their usual test split is the last 5,000,000
# (90M train / 5M valid / 5M test, as the character-level literature splits them).
ENWIK8_TEXT8_SIZE = 100_000_000
ENWIK8_TEXT8_TEST = 5_000_000


@dataclass(frozen=True)
class ClozeExample:
    """One CBT question: 20 story sentences, a query with `XXXXX` for the missing word, the answer
    and the candidates (10 in CBT)."""

    story: tuple[str, ...]
    query: str
    answer: str
    candidates: tuple[str, ...]


CLOZE_BLANK = "XXXXX"


# --------------------------------------------------------------------------------------------
# Detokenizers: undo the word-level tokenization of WikiText, PTB and CBT before GPT-2 reads them
#
# GPT-2 reads raw text; these datasets were tokenized for word-level models ("don 't", "1 @,@ 000",
# "`` Yes , '' he said"). The rules below are the well-known family used to compare GPT-2 on them;
# the paper's own detokenizers were not published, so numbers can differ slightly.


def _apply(text: str, rules: Sequence[tuple[str, str]], *, regex: bool = False) -> str:
    for old, new in rules:
        text = re.sub(old, new, text) if regex else text.replace(old, new)
    return text


_WIKITEXT_RULES = (
    ("s '", "s'"),  # plural possessive: "the players ' union"
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),  # joined numbers and words: "1 @,@ 000", "state @-@ of"
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),  # section headings
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"),
    ("\n ", "\n"),  # spaces around line breaks
    (" 's", "'s"),
)
_WIKITEXT_PAIRS = (  # no space just inside brackets and double quotes
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
)


def wikitext_detokenize(text: str) -> str:
    """WikiText -> plain text: `" @-@ "` -> `"-"`, `" @,@ "` -> `","`, `" @.@ "` -> `"."`, no space
    before punctuation (`" , "` -> `", "`), `"s '"` -> `"s'"`, `" 's"` -> `"'s"`, headings
    `"= = Title = ="` -> `"== Title =="`, no spaces inside brackets and quotes, none around line
    breaks. `<unk>` is kept as text (the paper notes it is rare in GPT-2's training data)."""
    return _apply(_apply(text, _WIKITEXT_RULES), _WIKITEXT_PAIRS, regex=True)


_CONTRACTIONS = tuple((f" {c}", c) for c in ("n't", "'s", "'re", "'ve", "'m", "'ll", "'d"))


def ptb_detokenize(text: str) -> str:
    """Penn Treebank (Mikolov's lower-cased, punctuation-free version) -> plain text: contractions
    rejoined (`"do n't"` -> `"don't"`, `"company 's"` -> `"company's"`), the space that begins and
    ends each line removed. `<unk>` and the number placeholder `N` are kept."""
    lines = [_apply(f" {line.strip()}", _CONTRACTIONS).strip() for line in text.split("\n")]
    return "\n".join(lines)


_CBT_RULES = (
    ("`` ", '"'),
    (" ''", '"'),
    ("''", '"'),
    ("``", '"'),  # LaTeX-style quotes
    ("-LRB- ", "("),
    (" -RRB-", ")"),
    (" ,", ","),
    (" .", "."),
    (" ;", ";"),
    (" :", ":"),
    (" !", "!"),
    (" ?", "?"),
) + _CONTRACTIONS


def cbt_detokenize(text: str) -> str:
    """Children's Book Test -> plain text: LaTeX quotes ``` `` ``` and `''` -> `"`, no space before
    punctuation (`" ,"` -> `","`), contractions rejoined, `-LRB-`/`-RRB-` -> brackets."""
    return _apply(text, _CBT_RULES)


# One Billion Word went through the WMT11 tokenizer script (Moses' tokenizer.perl): punctuation is
# split off ("said ." "5 %" "$ 3" "( AP )"), including ":" and "/" inside times and URLs
# ("10 : 30", "http : / / "), and an apostrophe between letters starts a token ("it 's",
# "don 't"). Numbers keep their "." and ",". Rules, in order:
_BILLION_WORD_RULES = (
    (r"(?<=\d) : (?=\d)", ":"),  # times: "10 : 30"
    (r"\b(https?) : / / ", r"\1://"),  # URLs
    (r" / ", "/"),  # "24 / 7", "and / or"
    (r" (n't|'[A-Za-z])", r"\1"),  # contractions: "it 's", "don 't", "they 've" (and "do n't")
    (r" ([.,;:!?%)\]}])", r"\1"),  # no space before closing punctuation
    (r"([(\[{$#\N{POUND SIGN}\N{EURO SIGN}]) ", r"\1"),  # nor after an opening bracket or a currency sign
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),  # double quotes, paired left to right: '" Yes , " he said'
)


def billion_word_detokenize(text: str) -> str:
    """One Billion Word -> plain text, line by line: contractions rejoined (`"it 's"` -> `"it's"`,
    `"don 't"` -> `"don't"`), no space before `. , ; : ! ? % ) ] }` nor after `( [ { $ # £ €`,
    `"10 : 30"` -> `"10:30"`, `"http : / / "` -> `"http://"`, `" / "` -> `"/"`, double quotes paired
    (`'" Yes , " he said .'` -> `'"Yes," he said.'`). Single quotes are left spaced: in the
    tokenized text a quoting `'` cannot be told from a plural possessive (`"players ' union"`)."""
    return "\n".join(_apply(line.strip(), _BILLION_WORD_RULES, regex=True) for line in text.split("\n"))


def no_detokenize(text: str) -> str:
    """The text as it is."""
    return text


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "none": no_detokenize,
    "wikitext": wikitext_detokenize,
    "ptb": ptb_detokenize,
    "cbt": cbt_detokenize,
    "1bw": billion_word_detokenize,
}


def detokenize(text: str, *, style: str) -> str:
    """Apply one of `DETOKENIZERS` ("none", "wikitext", "ptb", "cbt", "1bw")."""
    return DETOKENIZERS[_check_detokenizer(style)](text)


def _check_detokenizer(name: str) -> str:
    if name not in DETOKENIZERS:
        raise ValueError(f"unknown detokenizer {name!r}; choose one of {', '.join(DETOKENIZERS)}")
    return name


# --------------------------------------------------------------------------------------------
# Reading data files


def read_text(path: str | os.PathLike, *, what: str = "text") -> str:
    """A UTF-8 text file, or a ValueError that names the file and what was expected."""
    data = _read_bytes(path, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{os.fspath(path)} is not UTF-8 text ({e}); pass the {what} as a UTF-8 file") from None


def _read_bytes(path: str | os.PathLike, *, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"no such file: {os.fspath(path)}; pass the path of the {what}") from None
    except IsADirectoryError:
        raise ValueError(f"{os.fspath(path)} is a folder; pass the path of the {what} file inside it") from None
    except OSError as e:
        raise ValueError(f"cannot read {os.fspath(path)}: {e}") from None
    if not data.strip():
        raise ValueError(f"{os.fspath(path)} is empty; pass the {what}")
    return data


def read_lambada(path: str | os.PathLike) -> list[str]:
    """LAMBADA passages: JSON lines with a "text" field (OpenAI's `lambada_test.jsonl`), or plain
    text with one passage a line."""
    text = read_text(path, what="LAMBADA test file (JSON lines with a 'text' field, or one passage a line)")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines[0][1].lstrip().startswith("{"):
        return [line.strip() for _, line in lines]
    passages = []
    for n, line in lines:
        try:
            record = json.loads(line)
            passage = record["text"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{os.fspath(path)} line {n}: expected a JSON object with a 'text' field, got {line[:60]!r}"
            ) from None
        if not isinstance(passage, str):
            raise ValueError(f"{os.fspath(path)} line {n}: 'text' must be a string")
        passages.append(passage)
    return passages


def read_cbt(path: str | os.PathLike) -> list[ClozeExample]:
    """Children's Book Test questions (`cbtest_CN_test_2500ex.txt`, `cbtest_NE_test_2500ex.txt`):
    blocks of numbered lines separated by blank lines; lines 1-20 are the story, line 21 is
    `query<TAB>answer<TAB><TAB>candidate|candidate|...`."""
    text = read_text(path, what="CBT test file (cbtest_CN_test_2500ex.txt or cbtest_NE_test_2500ex.txt)")
    examples, story, where = [], [], os.fspath(path)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        number, _, body = line.partition(" ")
        if not number.isdigit():
            raise ValueError(
                f"{where} line {n}: expected a numbered CBT line ('1 ...' to "
                f"'21 query<TAB>answer<TAB><TAB>a|b|...'), got {line[:60]!r}"
            )
        if "\t" not in body:
            story.append(body.strip())
            continue
        fields = body.split("\t")
        if len(fields) != 4 or CLOZE_BLANK not in fields[0]:
            raise ValueError(
                f"{where} line {n}: a CBT query line is 'query with {CLOZE_BLANK}<TAB>answer<TAB><TAB>a|b|...'"
            )
        query, answer, _, candidates = fields
        candidates = tuple(c for c in candidates.strip().split("|") if c)
        if answer.strip() not in candidates or not story:
            raise ValueError(
                f"{where} line {n}: the answer {answer!r} must be one of the candidates, after the story lines"
            )
        examples.append(ClozeExample(tuple(story), query.strip(), answer.strip(), candidates))
        story = []
    if not examples:
        raise ValueError(f"{where} holds no CBT question (a line '21 query<TAB>answer<TAB><TAB>a|b|...')")
    return examples


def read_char_test(path: str | os.PathLike, *, what: str) -> str:
    """enwik8 / text8: the whole file, or its test split (the last 5,000,000 bytes) when it is the
    full 100,000,000-byte corpus. A split that starts inside a UTF-8 character skips its tail bytes."""
    data = _read_bytes(path, what=what)
    if len(data) == ENWIK8_TEXT8_SIZE:
        data = data[-ENWIK8_TEXT8_TEST:]
        while data and data[0] & 0xC0 == 0x80:  # a UTF-8 continuation byte
            data = data[1:]
    return data.decode("utf-8", errors="replace")


class SummaryExample(NamedTuple):
    """One CNN/DailyMail test article and its reference summary: the highlights, one sentence a
    line, as the hub dataset cnn_dailymail 3.0.0 stores them."""

    article: str
    highlights: str


SUMMARY_FIELDS = ("article", "highlights")
_SUMMARY_FILE = (
    "CNN/DailyMail test file (JSON lines or CSV with 'article' and 'highlights' fields, "
    "the columns of the hub dataset cnn_dailymail 3.0.0)"
)


def read_cnn_dailymail(path: str | os.PathLike) -> list[SummaryExample]:
    """CNN/DailyMail articles and highlights from JSON lines (one object a line) or CSV (a header
    row), with the fields `article` and `highlights`; other fields (`id`) are ignored. The format
    is told by the first character: `{` is JSON lines, anything else CSV."""
    text = read_text(path, what=_SUMMARY_FILE).removeprefix("\N{BYTE ORDER MARK}")
    where = os.fspath(path)
    rows = _json_rows(text, where) if text.lstrip().startswith("{") else _csv_rows(text, where)
    return [_summary_example(record, f"{where} {place}") for place, record in rows]


def _json_rows(text: str, where: str) -> list[tuple[str, dict]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(
                f"{where} line {n}: expected a JSON object with 'article' and 'highlights' fields, got {line[:60]!r}"
            ) from None
        rows.append((f"line {n}", record))
    return rows


def _csv_rows(text: str, where: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        missing = [field for field in SUMMARY_FIELDS if field not in header]
        if missing:
            raise ValueError(
                f"{where}: the CSV header has {', '.join(map(repr, header)) or 'no columns'}; "
                f"expected the columns 'article' and 'highlights' (the {_SUMMARY_FILE})"
            )
        rows = [(f"row {n}", record) for n, record in enumerate(reader, 1)]
    except csv.Error as e:
        raise ValueError(f"{where} line {reader.line_num}: not valid CSV ({e}); pass the {_SUMMARY_FILE}") from None
    if not rows:
        raise ValueError(f"{where} has a CSV header but no articles")
    return rows


def _summary_example(record, where: str) -> SummaryExample:
    """A record's `article` and `highlights`, or a ValueError naming the record and the fields."""
    if not isinstance(record, dict) or any(field not in record for field in SUMMARY_FIELDS):
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: expected the fields 'article' and 'highlights' (the columns of "
            f"cnn_dailymail 3.0.0), got {keys or 'no fields'}"
        )
    article, highlights = record["article"], record["highlights"]
    for field, value in (("article", article), ("highlights", highlights)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: '{field}' must be a non-empty string, got {value!r:.60}")
    return SummaryExample(article, highlights)


# --------------------------------------------------------------------------------------------
# Downloading with a checksum (through gpt2np.download, the path the checkpoint files take too)


@dataclass(frozen=True)
class DataSource:
    """A public copy of a test file: where to fetch it (tried in order) and its sha256."""

    filename: str
    sha256: str
    size: int
    urls: tuple[str, ...]


def _hub_dataset_url(repo: str, revision: str, path: str) -> str:
    return f"{endpoint()}/datasets/{repo}/resolve/{revision}/{path}"


# OpenAI's LAMBADA test set (5,153 passages, detokenized), as the GPT-2 authors published it.
# The same bytes are in EleutherAI/lambada_openai, pinned to a commit.
LAMBADA_SOURCE = DataSource(
    filename="lambada_test.jsonl",
    sha256="4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    size=1_819_752,
    urls=(
        _hub_dataset_url(
            "EleutherAI/lambada_openai", "900124bf3b8235c6daf21033af9948b3f07346c4", "data/lambada_test.jsonl"
        ),
        "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
    ),
)


def dataset_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where downloaded test files go: `cache_dir`, else $XDG_CACHE_HOME/gpt2np/datasets, else
    ~/.cache/gpt2np/datasets."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gpt2np" / "datasets"


def download(
    source: DataSource,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    timeout: tuple[float, float] | None = None,
    offline: bool | None = None,
) -> Path:
    """The cached copy of `source`, downloading it first when absent (or when its sha256 is wrong).

    It takes the checkpoint files' path, `gpt2np.download.cached_download`, so a test file gets the same
    care: each URL in turn, into a temporary file under a lock, resumed after a dropped connection, renamed
    into place only when its size and sha256 match. A progress bar goes to stderr (`progress=False` for
    none). Offline mode (`offline=True`, or HF_HUB_OFFLINE=1 as for models) reads the cache only. Raises
    an OSError that names the fix: the network, --data FILE, or offline mode.
    """
    return cached_download(
        source.urls,
        dataset_cache_dir(cache_dir) / source.filename,
        sha256=source.sha256,
        size=source.size,
        offline=offline,
        progress=progress,
        timeout=timeout,
        instead="download it by hand and pass --data FILE",
    )
