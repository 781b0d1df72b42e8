"""One checked download: every file gpt2np fetches, checkpoint blob or test set, comes through here.

Model files (`gpt2np.hub`) and evaluation data (`gpt2np.evaluate`) need the same guarantees, so they
share one implementation rather than two that drift apart:

- the bytes go to `{dest}.incomplete`, never straight to `dest`, so nothing half-written is read back;
- an interrupted transfer resumes from what `{dest}.incomplete` holds with `Range: bytes=N-` (a
  server that ignores the range sends the whole file, which then overwrites the partial one);
- a dropped, refused or stalled connection, or a 5xx answer, is retried `DOWNLOAD_RETRIES` times
  after a growing pause; a 404 or a wrong checksum is not, as asking again cannot cure it;
- the size and the sha256, when known, are checked before `os.replace` moves the file into place,
  and a file that fails the check is deleted, so the next attempt starts afresh;
- a lock (`flock` on a lock file) makes threads and processes that want the same file wait for the
  first one and then find its result. Without it two writers would append to one `.incomplete`
  file and corrupt it; with it the name can stay fixed, which is what lets the next call resume.

`HF_ENDPOINT` and `HF_HUB_OFFLINE` are read here, with huggingface_hub's meanings, so the hub and the
data downloads agree on where the hub is and on whether the network may be used at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no flock; files are still verified before they are renamed into place
    fcntl = None

DEFAULT_ENDPOINT = "https://huggingface.co"

# (connect, read) seconds for every request; a stalled read is retried with a Range request.
TIMEOUT = (10.0, 60.0)
# How many times a dropped or stalled transfer is resumed before giving up, and the pause
# before the n-th retry (n * RETRY_BACKOFF seconds).
DOWNLOAD_RETRIES = 3
RETRY_BACKOFF = 1.0
MAX_REDIRECTS = 5
# Bytes read from the network at a time: a dropped connection loses at most one chunk.
CHUNK_SIZE = 64 * 1024
# The values of HF_HUB_OFFLINE that mean "on", as huggingface_hub reads it.
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})

HeadersFor = Callable[[str], dict[str, str]]


class DownloadError(OSError):
    """Base class of every error this module raises."""


class UnreachableError(DownloadError):
    """The server could not be reached, or answered 5xx: the network may cure it, so it is retried."""


class HTTPError(DownloadError):
    """The server refused the file (a 4xx or an unexpected answer): retrying the same URL will not help.

    `response` is the (closed) answer, so a caller can read the status and headers its protocol defines.
    """

    def __init__(self, message: str, response: requests.Response):
        super().__init__(message)
        self.response = response


class ChecksumError(DownloadError):
    """The downloaded bytes did not have the expected size or sha256; they were deleted."""


class OfflineError(DownloadError):
    """Offline mode is on and the file is not cached."""


# ---------------------------------------------------------------------------------------------
# Settings from the environment


def offline_mode(offline: bool | None = None) -> bool:
    """`offline` when given, else whether $HF_HUB_OFFLINE holds a true value ("1", "true", "yes", "on").

    huggingface_hub reads the same variable the same way, so one setting keeps both tools off the network.
    """
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES


def endpoint() -> str:
    """The hub's base URL: $HF_ENDPOINT (a mirror, or a private hub) else the public hub, no trailing slash.

    Read at each call, so setting the variable takes effect without re-importing anything.
    """
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def origin(url: str) -> str:
    """`scheme://host:port` of a URL, the port filled in: URLs of one origin reach one server, which is what
    decides whether a token may be sent along."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


# ---------------------------------------------------------------------------------------------
# Files on disk


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read a chunk at a time so a multi-gigabyte checkpoint never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if needed), waiting while another thread or process holds it.

    A released lock file may be deleted (by another tool, or here with `remove=True`), so after each wait the
    lock is taken again until the file locked is the one on disk: two holders never lock two files of one
    name. `remove=True` deletes the file before releasing it, keeping a cache folder free of lock files; leave
    it off for a lock shared with a tool that does not re-check (huggingface_hub's `.locks`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    while True:
        with open(path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if not _is_on_disk(handle, path):
                continue
            try:
                yield
            finally:
                if remove:
                    path.unlink(missing_ok=True)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return


def _is_on_disk(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _partial_size(partial: Path, expected: int | None) -> int:
    """Bytes of an earlier attempt worth resuming from; a partial larger than the file is dropped."""
    size = partial.stat().st_size if partial.exists() else 0
    if expected is not None and size > expected:
        partial.unlink()
        return 0
    return size


def _verify(partial: Path, *, size: int | None, sha256: str | None, desc: str) -> None:
    """Check the size, then the sha256; a mismatch deletes the file, since resuming it would only grow it."""
    actual = partial.stat().st_size
    if size is not None and actual != size:
        partial.unlink()
        raise ChecksumError(
            f"Downloaded {desc!r} has {actual} bytes where {size} were announced; it was deleted. Download it again."
        )
    if sha256 is None:
        return
    digest = sha256_file(partial)
    if digest != sha256:
        partial.unlink()
        raise ChecksumError(
            f"Downloaded {desc!r}: sha256 mismatch, the checksum did not match (got {digest}, expected {sha256}); "
            "it was deleted. Download it again; if it keeps failing, something on the way alters the bytes."
        )


# ---------------------------------------------------------------------------------------------
# The network


def request(
    session: requests.Session,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    headers_for: HeadersFor | None = None,
    stream: bool = False,
    follow_other_hosts: bool = True,
    timeout: tuple[float, float] | None = None,
) -> requests.Response:
    """Send one request, following redirects by hand so that each hop gets the headers meant for it.

    `headers` go to every hop (a Range must reach the server that has the bytes); `headers_for(url)` adds
    those for one URL only (the hub's token, never sent to the CDN it redirects to). With
    `follow_other_hosts=False` a redirect to another origin is returned as is: the hub describes a large
    file in that redirect. `Accept-Encoding: identity` asks for the bytes as stored, so their size can be
    checked. A refused or timed-out connection raises UnreachableError.
    """
    for _ in range(MAX_REDIRECTS + 1):
        sent = {"Accept-Encoding": "identity", **(headers or {}), **(headers_for(url) if headers_for else {})}
        response = _send(session, method, url, sent, stream=stream, timeout=timeout or TIMEOUT)
        if not response.is_redirect:
            return response
        target = urljoin(url, response.headers["Location"])
        if not follow_other_hosts and origin(target) != origin(url):
            return response
        response.close()
        url = target
    raise DownloadError(f"Too many redirects (more than {MAX_REDIRECTS}) while fetching {url}.")


def _send(
    session: requests.Session,
    method: str,
    url: str,
    headers: dict[str, str],
    *,
    stream: bool,
    timeout: tuple[float, float],
) -> requests.Response:
    """One hop, with a failure to connect turned into this module's errors (so callers catch OSError alone)."""
    try:
        return session.request(method, url, headers=headers, allow_redirects=False, stream=stream, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise UnreachableError(f"Could not reach {origin(url)}: {error}.") from error
    except requests.RequestException as error:
        raise DownloadError(f"Could not request {url}: {error}. Check the URL.") from error


# What a retry with a Range request may cure: a dropped, refused or stalled connection, or a 5xx.
_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    UnreachableError,
)


@dataclass(frozen=True)
class _Transfer:
    """One file on its way: where from, into which partial file, and how many bytes are expected."""

    url: str
    partial: Path
    size: int | None
    desc: str
    session: requests.Session
    headers_for: HeadersFor | None
    timeout: tuple[float, float] | None


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    session: requests.Session | None = None,
    headers_for: HeadersFor | None = None,
    desc: str | None = None,
    progress: bool = True,
    timeout: tuple[float, float] | None = None,
) -> Path:
    """Download `url` to `dest` and return `dest`: the one place gpt2np writes downloaded bytes.

    The bytes go to `{dest}.incomplete` (resuming what an earlier attempt left there), then `size` and
    `sha256`, when given, are checked, and only then is the file renamed to `dest`. The caller holds a lock
    for `dest` (`file_lock`), so the partial file is its alone. Transient failures are retried; when they
    persist, UnreachableError says so and the partial file stays for the next call to resume. A failed check
    raises ChecksumError, a refusal HTTPError. `progress` shows a bar labelled `desc` (default: the file name)
    on stderr; `headers_for` and `timeout` are as in `request`.
    """
    dest = Path(dest)
    partial = dest.with_name(dest.name + ".incomplete")
    partial.parent.mkdir(parents=True, exist_ok=True)
    desc = desc or dest.name
    with contextlib.ExitStack() as stack:
        if session is None:
            session = stack.enter_context(requests.Session())
        job = _Transfer(url, partial, size, desc, session, headers_for, timeout)
        bar = stack.enter_context(_progress_bar(desc, size, _partial_size(partial, size), enabled=progress))
        _transfer_with_retries(job, bar)
    _verify(partial, size=size, sha256=sha256, desc=desc)
    os.replace(partial, dest)
    return dest


def _progress_bar(desc: str, total: int | None, initial: int, *, enabled: bool) -> tqdm:
    return tqdm(
        desc=desc,
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled,
        leave=True,
    )


def _transfer_with_retries(job: _Transfer, bar: tqdm) -> None:
    """Resume the transfer after each transient failure, pausing longer each time, until it completes."""
    for attempt in range(DOWNLOAD_RETRIES + 1):
        try:
            _transfer(job, bar)
            return
        except _TRANSIENT_ERRORS as error:
            if attempt == DOWNLOAD_RETRIES:
                kept = _partial_size(job.partial, job.size)
                resume = f"; the {kept} bytes received are kept and the next call resumes from there" if kept else ""
                raise UnreachableError(
                    f"Downloading {job.desc!r} from {origin(job.url)} failed {attempt + 1} times ({error}){resume}."
                ) from error
            time.sleep(RETRY_BACKOFF * (attempt + 1))


def _transfer(job: _Transfer, bar: tqdm) -> None:
    """One GET of the rest of the file, appended to the partial one (or replacing it if the server restarts)."""
    have = _partial_size(job.partial, job.size)
    if have and have == job.size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    response = request(
        job.session, "GET", job.url, headers=headers, headers_for=job.headers_for, stream=True, timeout=job.timeout
    )
    with response:
        if have and response.status_code == 416:  # the partial already holds the whole file, or more
            job.partial.unlink()
            bar.reset(total=job.size)
            return _transfer(job, bar)
        mode = _write_mode(response, have, job.desc)
        if mode == "wb" and have:
            bar.reset(total=job.size)
        with open(job.partial, mode) as out:
            for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
                out.write(chunk)
                bar.update(len(chunk))


def _write_mode(response: requests.Response, have: int, desc: str) -> str:
    """ "ab" when the server continues at byte `have`, "wb" when it sends the whole file; else raise."""
    status = response.status_code
    if have and status == 206 and _range_start(response) == have:
        return "ab"
    if status == 200:
        return "wb"  # no range asked, or the server ignored it: start over from zero
    message = f"{origin(response.url)} answered HTTP {status} for {desc!r}."
    if status >= 500:
        raise UnreachableError(message)
    raise HTTPError(message, response)


def _range_start(response: requests.Response) -> int | None:
    """The first byte of a 206 answer, from `Content-Range: bytes START-END/TOTAL`."""
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# A cached file pinned by its sha256


def cached_download(
    urls: str | Iterable[str],
    dest: str | os.PathLike,
    *,
    sha256: str,
    size: int | None = None,
    offline: bool | None = None,
    progress: bool = True,
    timeout: tuple[float, float] | None = None,
    instead: str = "",
) -> Path:
    """The file `dest` with this sha256, downloaded first from the first of `urls` that serves it.

    A cached copy is used when its sha256 matches and replaced when it does not. Otherwise, under a lock
    beside it (`{dest}.lock`, removed afterwards), each URL is tried in turn with `download_file`. A partial
    file left by an earlier call is resumed whichever mirror it came from, since the checksum decides. In
    offline mode (`offline=True`, or HF_HUB_OFFLINE) nothing is fetched. `instead` names what the caller can
    do when no download is possible (e.g. "pass --data FILE"); the OSError raised then names it too.
    """
    dest = Path(dest)
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    if not urls:
        raise ValueError(f"no URL to download {dest.name} from: pass at least one")
    if _is_cached(dest, sha256):
        return dest
    if offline_mode(offline):
        raise _offline_error(dest, offline, instead)
    with file_lock(dest.with_name(dest.name + ".lock"), remove=True):
        if _is_cached(dest, sha256):  # another thread or process fetched it while this one waited
            return dest
        return _download_from_any(
            urls, dest, sha256=sha256, size=size, progress=progress, timeout=timeout, instead=instead
        )


def _is_cached(dest: Path, sha256: str) -> bool:
    return dest.is_file() and sha256_file(dest) == sha256


def _offline_error(dest: Path, offline: bool | None, instead: str) -> OfflineError:
    if offline:
        why, undo = "offline=True was passed", "pass offline=False"
    else:
        why, undo = f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')} is set", "unset HF_HUB_OFFLINE"
    fix = f"{instead}, or {undo}" if instead else undo
    return OfflineError(f"{dest.name} is not in {dest.parent} and {why}, so it cannot be downloaded: {fix}.")


def _download_from_any(urls: tuple[str, ...], dest: Path, *, sha256, size, progress, timeout, instead) -> Path:
    """Try each URL in turn; the error names every URL's failure, so no mirror's problem is hidden."""
    failures = []
    with requests.Session() as session:
        for url in urls:
            try:
                return download_file(
                    url, dest, size=size, sha256=sha256, session=session, progress=progress, timeout=timeout
                )
            except DownloadError as error:
                failures.append(f"{url}: {str(error).rstrip('.')}")
    fix = f"Check the network, or {instead}." if instead else "Check the network and try again."
    raise DownloadError(f"Could not download {dest.name} (sha256 {sha256}): {'; '.join(failures)}. {fix}")
