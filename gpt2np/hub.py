"""Download GPT-2 checkpoints from the HuggingFace hub into the hub's own cache.

Only `requests` and `tqdm` are used, yet the cache on disk is the one `huggingface_hub` keeps, so a
checkpoint fetched by either tool is found by the other, online or offline:

    {cache}/models--{org}--{name}/
        blobs/{etag}                        the bytes of each file, named by its etag
        snapshots/{commit}/{file}           relative symlinks to ../../blobs/{etag}
        refs/{revision}                     the commit the branch or tag pointed to (no newline)
    {cache}/.locks/models--{org}--{name}/{etag}.lock   one lock per blob, shared with huggingface_hub

The protocol, as the hub speaks it:

- `HEAD {endpoint}/{repo}/resolve/{revision}/{file}` answers with `X-Repo-Commit` (the commit the
  revision points to) and the file's `ETag` and `Content-Length`. A large (LFS) file answers
  `302` instead, to a CDN on another host, with `X-Linked-Etag` (the sha256 of the content) and
  `X-Linked-Size`. The redirect is not followed for HEAD: its headers are the metadata.
- `GET` of the resolve URL (small files) or of the redirect's `Location` (large files) returns the
  bytes, honouring `Range: bytes=N-` so an interrupted transfer resumes.
- Errors name their cause in `X-Error-Code`: `RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
  `GatedRepo`. A 401 may mean private, gated or missing: the hub does not say which.

The bytes themselves are fetched by `gpt2np.download`, the one download path gpt2np has: each blob
goes to `blobs/{etag}.incomplete` under the blob's lock, resumes after a dropped connection, has its
size (and its sha256 for LFS files) checked, and only then is renamed into place, so a half-written
or corrupt file is never read back. What stays here is the hub's own: the HEAD metadata, the
`X-Error-Code` answers, the cache layout, and the token, sent to the hub's own host only, never to
the CDN.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, urljoin

import requests

from . import download

SHORT_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt")

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFE_ETAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # it names a file in blobs/


class HubError(OSError):
    """Base class of every error this module raises."""


class RepositoryNotFoundError(HubError):
    """The repository does not exist, or is private and no valid token was sent."""


class RevisionNotFoundError(HubError):
    """The repository exists but has no such branch, tag or commit."""


class EntryNotFoundError(HubError):
    """The repository exists but has no such file at this revision."""


class GatedRepoError(HubError):
    """The repository is gated: its conditions must be accepted on the hub, then a token sent."""


class ChecksumError(HubError, download.ChecksumError):
    """A downloaded file's size or sha256 did not match what the hub announced."""


class OfflineCacheMissError(HubError):
    """Offline mode is on and the cache does not hold the requested snapshot."""


class HubUnreachableError(HubError, download.UnreachableError):
    """The hub could not be reached (connection error, timeout, or a 5xx answer)."""


def resolve_repo_id(name: str) -> str:
    """Map a short model name ("gpt2", "gpt2-xl", "distilgpt2") to its hub repo id.

    Anything else is returned unchanged, so full ids ("openai-community/gpt2") pass through.
    """
    return SHORT_NAMES.get(name, name)


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The hub cache folder: `cache_dir`, else $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (as huggingface_hub decides)."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(xdg_cache).expanduser() / "huggingface" / "hub"


def snapshot_download(
    name_or_repo_id: str,
    *,
    revision: str = "main",
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    offline: bool | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Download a GPT-2 checkpoint into the hub cache and return its snapshot folder.

    The folder (`.../models--{org}--{name}/snapshots/{commit}/`) holds `config.json`, the
    safetensors weights (`model.safetensors`, or `model.safetensors.index.json` and every shard it
    names) and `vocab.json` + `merges.txt` when the repo has them. Files already in the cache are
    not downloaded again.

    `token` defaults to $HF_TOKEN. `offline` defaults to $HF_HUB_OFFLINE; when on, only the cache
    is read. When the hub cannot be reached, a complete cached snapshot of `revision` is returned
    instead. `progress=False` turns off the progress bars (written to stderr, one per large file).
    """
    repo_id = resolve_repo_id(name_or_repo_id)
    if not _is_plain_path(revision):
        raise ValueError(f"revision={revision!r} is not a branch, tag or commit hash (e.g. 'main').")
    cache = hub_cache_dir(cache_dir)
    repo = _CachedRepo(cache=cache, repo_id=repo_id)
    if download.offline_mode(offline):
        return _cached_snapshot_or_raise(repo, revision)
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        with requests.Session() as session:
            hub = _Hub(session=session, endpoint=download.endpoint(), token=token, repo_id=repo_id, progress=progress)
            return _download_snapshot(hub, repo, revision)
    except HubUnreachableError as error:
        snapshot = _complete_cached_snapshot(repo, revision)
        if snapshot is not None:
            return snapshot
        raise HubUnreachableError(
            f"{error} No complete snapshot of {repo_id!r} at revision {revision!r} is cached in {cache} "
            "to fall back on. Check the network (and HF_ENDPOINT if set) and try again; once a snapshot "
            "is cached, offline=True or HF_HUB_OFFLINE=1 uses it without any network."
        ) from error


# ---------------------------------------------------------------------------------------------
# The cache on disk


@dataclass(frozen=True)
class _CachedRepo:
    """Paths of one repo inside the hub cache."""

    cache: pathlib.Path
    repo_id: str

    @property
    def folder_name(self) -> str:
        return "--".join(["models", *self.repo_id.split("/")])

    @property
    def folder(self) -> pathlib.Path:
        return self.cache / self.folder_name

    def blob(self, etag: str) -> pathlib.Path:
        return self.folder / "blobs" / etag

    def lock(self, etag: str) -> pathlib.Path:
        # The same lock file huggingface_hub takes, so the two tools never fetch one blob at once.
        return self.cache / ".locks" / self.folder_name / f"{etag}.lock"

    def ref(self, revision: str) -> pathlib.Path:
        return self.folder / "refs" / revision

    def snapshot(self, commit: str) -> pathlib.Path:
        return self.folder / "snapshots" / commit


def _cached_commit(repo: _CachedRepo, revision: str) -> str | None:
    """The commit `revision` resolved to when it was last downloaded, if known."""
    if _COMMIT_HASH.fullmatch(revision):
        return revision
    try:
        return repo.ref(revision).read_text().strip() or None
    except OSError:
        return None


def _missing_files(snapshot: pathlib.Path) -> list[str]:
    """The files a loadable checkpoint needs that `snapshot` lacks (tokenizer files are optional)."""
    missing = [] if (snapshot / CONFIG_FILE).is_file() else [CONFIG_FILE]
    if (snapshot / WEIGHTS_FILE).is_file():
        return missing
    index = snapshot / WEIGHTS_INDEX_FILE
    if not index.is_file():
        return [*missing, WEIGHTS_FILE]
    try:
        shards = _shard_names(json.loads(index.read_text()), source=str(index))
    except (HubError, ValueError):
        return [*missing, WEIGHTS_INDEX_FILE]
    return [*missing, *(shard for shard in shards if not (snapshot / shard).is_file())]


def _complete_cached_snapshot(repo: _CachedRepo, revision: str) -> pathlib.Path | None:
    commit = _cached_commit(repo, revision)
    if commit is None or _missing_files(repo.snapshot(commit)):
        return None
    return repo.snapshot(commit)


def _cached_snapshot_or_raise(repo: _CachedRepo, revision: str) -> pathlib.Path:
    commit = _cached_commit(repo, revision)
    if commit is None:
        raise OfflineCacheMissError(
            f"Offline mode is on (offline=True or HF_HUB_OFFLINE=1) and {repo.repo_id!r} at revision "
            f"{revision!r} is not in the cache {repo.cache}. Download it once with network access, "
            "or turn offline mode off."
        )
    missing = _missing_files(repo.snapshot(commit))
    if missing:
        raise OfflineCacheMissError(
            f"Offline mode is on (offline=True or HF_HUB_OFFLINE=1) and the cached snapshot of "
            f"{repo.repo_id!r} at revision {revision!r} (commit {commit}) lacks {', '.join(missing)}. "
            "Download it once with network access, or turn offline mode off."
        )
    return repo.snapshot(commit)


def _write_ref(repo: _CachedRepo, revision: str, commit: str) -> None:
    """Record which commit a branch or tag points to; a commit hash needs no ref."""
    if revision == commit:
        return
    path = repo.ref(revision)
    if path.is_file() and path.read_text() == commit:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    staged.write_text(commit)
    os.replace(staged, path)


def _link_into_snapshot(blob: pathlib.Path, pointer: pathlib.Path) -> None:
    """Point `snapshots/{commit}/{file}` at its blob with a relative symlink, atomically."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    staged = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.link")
    staged.symlink_to(os.path.relpath(blob, pointer.parent))
    os.replace(staged, pointer)


# ---------------------------------------------------------------------------------------------
# Talking to the hub


@dataclass(frozen=True)
class _Hub:
    """One download session with the hub for one repo."""

    session: requests.Session
    endpoint: str
    token: str | None
    repo_id: str
    progress: bool

    def resolve_url(self, revision: str, filename: str) -> str:
        return f"{self.endpoint}/{self.repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    def headers_for(self, url: str) -> dict[str, str]:
        # The token is for the hub only: never send it to the CDN a large file redirects to.
        if self.token and download.origin(url) == download.origin(self.endpoint):
            return {"Authorization": f"Bearer {self.token}"}
        return {}


@dataclass(frozen=True)
class _FileInfo:
    """What a HEAD request tells about one file."""

    filename: str
    commit: str
    etag: str
    size: int | None
    url: str  # where to GET the bytes: the resolve URL, or the CDN for large files

    @property
    def is_lfs(self) -> bool:
        return _SHA256.fullmatch(self.etag) is not None


def _normalize_etag(etag: str) -> str:
    """`W/"abc"` or `"abc"` -> `abc`, the blob's file name."""
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


@contextlib.contextmanager
def _hub_errors() -> Iterator[None]:
    """Re-raise `gpt2np.download`'s errors as this module's, so a caller catches HubError alone."""
    try:
        yield
    except HubError:
        raise
    except download.ChecksumError as error:
        raise ChecksumError(str(error)) from error
    except download.UnreachableError as error:
        raise HubUnreachableError(str(error)) from error
    except download.DownloadError as error:
        raise HubError(str(error)) from error


def _raise_for_status(hub: _Hub, response: requests.Response, revision: str, filename: str) -> None:
    """Turn an error answer into the matching HubError, with a message that names the fix."""
    status = response.status_code
    if status < 400:
        return
    code = response.headers.get("X-Error-Code", "")
    repo = hub.repo_id
    if code == "RevisionNotFound":
        raise RevisionNotFoundError(
            f"Revision {revision!r} does not exist in {repo!r}: pass revision= a branch, tag or "
            "commit hash of that repository (the default is 'main')."
        )
    if code == "EntryNotFound":
        raise EntryNotFoundError(f"File {filename!r} is not in {repo!r} at revision {revision!r}.")
    if code == "GatedRepo":
        raise GatedRepoError(
            f"{repo!r} is gated: accept its conditions on its hub page, then "
            + ("check that your token belongs to that account." if hub.token else "set HF_TOKEN or pass token=.")
        )
    if status in (401, 403) or code == "RepoNotFound":
        if hub.token:
            hint = "If it is private or gated, check that your token (token= or HF_TOKEN) grants access to it."
        else:
            hint = "If it is private or gated, set HF_TOKEN or pass token= with a token that can read it."
        raise RepositoryNotFoundError(
            f"Repository {repo!r} was not found on {hub.endpoint} (HTTP {status}). Check its name "
            f"(short names: {', '.join(SHORT_NAMES)}). {hint}"
        )
    if status >= 500:
        raise HubUnreachableError(f"The hub at {hub.endpoint} answered HTTP {status} for {filename!r}.")
    raise HubError(f"The hub at {hub.endpoint} answered HTTP {status} for {filename!r} of {repo!r}.")


def _file_info(hub: _Hub, revision: str, filename: str) -> _FileInfo:
    """HEAD one file: learn the commit, its etag, its size and where its bytes are."""
    url = hub.resolve_url(revision, filename)
    with _hub_errors():
        response = download.request(hub.session, "HEAD", url, headers_for=hub.headers_for, follow_other_hosts=False)
    response.close()
    _raise_for_status(hub, response, revision, filename)
    headers = response.headers
    commit = headers.get("X-Repo-Commit")
    etag = headers.get("X-Linked-Etag") or headers.get("ETag")
    if not commit or not etag:
        missing = "X-Repo-Commit" if not commit else "ETag"
        raise HubError(
            f"{hub.endpoint} answered for {filename!r} without the {missing} header, so it is not a "
            "HuggingFace hub: check HF_ENDPOINT (unset it to use the public hub)."
        )
    etag = _normalize_etag(etag)
    if not _SAFE_ETAG.fullmatch(etag):
        raise HubError(f"{hub.endpoint} answered for {filename!r} with the etag {etag!r}, which cannot name a file.")
    if response.is_redirect:
        size = headers.get("X-Linked-Size")
        url = urljoin(response.url, headers["Location"])
    else:
        size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    return _FileInfo(filename, commit, etag, int(size) if size else None, url)


# ---------------------------------------------------------------------------------------------
# Downloading blobs


def _download_snapshot(hub: _Hub, repo: _CachedRepo, revision: str) -> pathlib.Path:
    """Fetch config, weights and tokenizer files of one commit; return the snapshot folder."""
    config = _file_info(hub, revision, CONFIG_FILE)
    commit = config.commit
    _write_ref(repo, revision, commit)
    # Every other file is asked for at the commit, so all of them come from the same one.
    _fetch(hub, repo, commit, CONFIG_FILE, info=config)
    _fetch_weights(hub, repo, commit)
    for filename in TOKENIZER_FILES:
        with contextlib.suppress(EntryNotFoundError):
            _fetch(hub, repo, commit, filename)
    return repo.snapshot(commit)


def _fetch_weights(hub: _Hub, repo: _CachedRepo, commit: str) -> None:
    try:
        _fetch(hub, repo, commit, WEIGHTS_FILE)
        return
    except EntryNotFoundError:
        pass  # maybe a sharded checkpoint, whose index names the shards
    try:
        index_path = _fetch(hub, repo, commit, WEIGHTS_INDEX_FILE)
    except EntryNotFoundError:
        raise EntryNotFoundError(
            f"{hub.repo_id!r} at commit {commit} has no safetensors weights (neither {WEIGHTS_FILE} nor "
            f"{WEIGHTS_INDEX_FILE}). gpt2np loads safetensors checkpoints only: pick a repo that has them."
        ) from None
    try:
        index = json.loads(index_path.read_text())
    except ValueError as error:
        raise HubError(f"{WEIGHTS_INDEX_FILE} of {hub.repo_id!r} is not valid JSON: {error}.") from error
    for shard in _shard_names(index, source=f"{WEIGHTS_INDEX_FILE} of {hub.repo_id!r}"):
        _fetch(hub, repo, commit, shard)


def _shard_names(index: dict, *, source: str) -> list[str]:
    """The distinct shard files an index's `weight_map` names, refusing paths that leave the repo."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HubError(f"{source} has no 'weight_map' naming the shard files.")
    for shard in weight_map.values():
        if not _is_plain_path(shard):
            raise HubError(f"{source} names the shard {shard!r}, which is not a plain path inside the repo.")
    return sorted(set(weight_map.values()))


def _is_plain_path(path) -> bool:
    """A relative '/'-separated path with no '', '.' or '..' part: it cannot leave its folder."""
    if not isinstance(path, str) or not path or "\\" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _fetch(hub: _Hub, repo: _CachedRepo, commit: str, filename: str, *, info=None) -> pathlib.Path:
    """Make `snapshots/{commit}/{filename}` exist, downloading its blob unless it is cached."""
    pointer = repo.snapshot(commit) / filename
    if pointer.is_file():  # follows the symlink: the blob is there too
        return pointer
    info = info or _file_info(hub, commit, filename)
    blob = repo.blob(info.etag)
    with download.file_lock(repo.lock(info.etag)):
        if not blob.is_file():
            _download_blob(hub, info, blob)
        _link_into_snapshot(blob, pointer)
    return pointer


def _download_blob(hub: _Hub, info: _FileInfo, blob: pathlib.Path) -> None:
    """Fetch one blob through `gpt2np.download`: resumed, retried, verified, then renamed into place.

    The caller holds the blob's lock. Only LFS files have a sha256 to check (their etag) and a progress
    bar: small files are verified by their size.
    """
    sha256 = info.etag if info.is_lfs else None
    progress = hub.progress and info.is_lfs
    with _hub_errors():
        try:
            download.download_file(
                info.url,
                blob,
                size=info.size,
                sha256=sha256,
                session=hub.session,
                headers_for=hub.headers_for,
                desc=info.filename,
                progress=progress,
            )
        except download.HTTPError as error:
            _raise_for_download_status(hub, info, error.response)


def _raise_for_download_status(hub: _Hub, info: _FileInfo, response: requests.Response) -> None:
    """A refused GET: the hub's own errors by their X-Error-Code, else a CDN link that went bad."""
    where = download.origin(response.url)
    if where == download.origin(hub.endpoint):
        _raise_for_status(hub, response, info.commit, info.filename)
    raise HubError(
        f"Downloading {info.filename!r} of {hub.repo_id!r} from {where} failed with HTTP {response.status_code}. "
        "Run it again: the hub hands out a fresh CDN link each time."
    )
