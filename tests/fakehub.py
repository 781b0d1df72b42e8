"""A loopback stand-in for the HuggingFace hub and its CDN, for tests that must not use the network.

Two HTTP servers on 127.0.0.1, each on its own port:

- the hub (`FakeHub.endpoint`, `http://127.0.0.1:PORT`) answers
  `HEAD|GET /{repo}/resolve/{revision}/{file}` like the real one: small files directly, with
  `ETag` = their git blob sha1; large (LFS) files with a `302` to the CDN, carrying
  `X-Linked-Etag` = sha256 and `X-Linked-Size`; always `X-Repo-Commit`; errors with
  `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`).
- the CDN (`http://localhost:PORT2`, another host name as well as another port, as the real CDN
  is another host) serves blobs by sha256 and honours `Range`.

Every request is recorded (`FakeHub.requests`) with its headers, so a test can check what each
host received. `FakeHub.faults` makes the CDN misbehave: cut a body half-way, stall it, corrupt
it, ignore `Range`, send it slowly, or answer 503.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's content: sha1 of `blob {size}\\0{content}`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeRepo:
    """A model repo: commits (id -> files), branches (name -> commit) and who may read it."""

    repo_id: str
    commits: dict[str, dict[str, bytes]]
    branches: dict[str, str]
    lfs_suffixes: tuple[str, ...] = (".safetensors",)
    token: str | None = None  # when set, requests must carry `Authorization: Bearer {token}`
    gated: bool = False  # with a token: a 401 says GatedRepo instead of RepoNotFound

    @property
    def head(self) -> str:
        return self.branches["main"]

    def is_lfs(self, filename: str) -> bool:
        return filename.endswith(self.lfs_suffixes)


@dataclass
class Faults:
    """How the CDN misbehaves. Counters go down by one each time a fault is applied."""

    at: int | None = None  # byte offset of the body where a drop or stall happens (default: half)
    drops: int = 0  # bodies cut at `at` (the connection is closed)
    stalls: int = 0  # bodies that pause `stall_seconds` at `at`
    stall_seconds: float = 0.0
    corrupt: int = 0  # bodies served with one byte flipped
    ignore_range: bool = False  # answer 200 with the whole file even when a Range is asked
    chunk_delay: float = 0.0  # pause between chunks of every body (to make downloads overlap)
    server_errors: int = 0  # GETs answered 503


@dataclass(frozen=True)
class Request:
    host: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._hub = _serve(self, "hub")
        self._cdn = _serve(self, "cdn")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://localhost:{self._cdn.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], **options) -> FakeRepo:
        """Create a repo whose `main` branch holds `files`; options are FakeRepo's fields."""
        commit = _commit_id(repo_id, files, parent="")
        repo = FakeRepo(repo_id, commits={commit: dict(files)}, branches={"main": commit}, **options)
        self.repos[repo_id] = repo
        return repo

    def push(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main") -> str:
        """Add a commit holding `files` and move `branch` to it; returns the new commit id."""
        repo = self.repos[repo_id]
        commit = _commit_id(repo_id, files, parent=repo.branches.get(branch, ""))
        repo.commits[commit] = dict(files)
        repo.branches[branch] = commit
        return commit

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def seen(self, host: str | None = None, method: str | None = None, path_end: str = "") -> list[Request]:
        """The recorded requests to `host` with `method` whose path ends with `path_end`."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (host is None or r.host == host)
                and (method is None or r.method == method)
                and urlsplit(r.path).path.endswith(path_end)
            ]

    def blob(self, digest: str) -> bytes | None:
        for repo in self.repos.values():
            for files in repo.commits.values():
                for data in files.values():
                    if sha256(data) == digest:
                        return data
        return None

    def close(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _commit_id(repo_id: str, files: dict[str, bytes], *, parent: str) -> str:
    digest = hashlib.sha1(f"{repo_id}\0{parent}".encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + git_blob_sha1(files[name]).encode())
    return digest.hexdigest()


def _serve(hub: FakeHub, role: str) -> ThreadingHTTPServer:
    handler = type(f"{role.title()}Handler", (_Handler,), {"hub": hub, "role": role})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    return server


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    role: str
    timeout = 10  # a client that vanishes never holds a server thread for long

    def log_message(self, format, *args):  # keep stderr clean: tests assert on it
        pass

    def do_HEAD(self):
        self._answer(send_body=False)

    def do_GET(self):
        self._answer(send_body=True)

    def _answer(self, *, send_body: bool) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.hub.record(Request(self.role, self.command, self.path, headers))
        try:
            if self.role == "hub":
                self._hub_answer(send_body)
            else:
                self._cdn_answer(send_body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) or was cut off on purpose

    # -- hub ------------------------------------------------------------------------------------

    def _hub_answer(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        repo_part, marker, rest = path.partition("/resolve/")
        revision_part, _, file_part = rest.partition("/")
        if not marker or not file_part:
            return self._error(404, "", "Not a resolve URL", send_body)
        repo = self.hub.repos.get(unquote(repo_part.lstrip("/")))
        revision, filename = unquote(revision_part), unquote(file_part)

        if repo is None:  # the hub does not tell a missing repo from a private one
            return self._error(401, "RepoNotFound", "Repository not found", send_body)
        if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            code = "GatedRepo" if repo.gated else "RepoNotFound"
            return self._error(401, code, "Access restricted: authenticate", send_body)
        commit = repo.branches.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id", send_body)
        files = repo.commits[commit]
        if filename not in files:
            return self._error(404, "EntryNotFound", "Entry not found", send_body, commit=commit)

        data = files[filename]
        if repo.is_lfs(filename):
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\nsize {len(data)}\n"
            self.send_response(302)
            self.send_header("Location", f"{self.hub.cdn}/{sha256(data)}?expires={int(time.time()) + 3600}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{git_blob_sha1(pointer.encode())}"')
            self.send_header("X-Linked-Etag", f'"{sha256(data)}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._send_file(data, send_body, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'})

    def _error(self, status: int, code: str, message: str, send_body: bool, *, commit: str | None = None):
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    # -- CDN ------------------------------------------------------------------------------------

    def _cdn_answer(self, send_body: bool) -> None:
        digest = urlsplit(self.path).path.strip("/")
        data = self.hub.blob(digest)
        if data is None:
            return self._error(404, "", "NoSuchKey", send_body)
        if send_body and self.hub.faults.server_errors > 0:
            self.hub.faults.server_errors -= 1
            return self._error(503, "", "Slow down", send_body)
        return self._send_file(data, send_body, {"ETag": f'"{digest}"'}, faults=self.hub.faults if send_body else None)

    # -- both -----------------------------------------------------------------------------------

    def _send_file(self, data: bytes, send_body: bool, headers: dict[str, str], *, faults: Faults | None = None):
        start = _range_start(self.headers.get("Range"))
        if faults is not None and faults.ignore_range:
            start = None
        if start is not None and start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if faults is not None and faults.corrupt > 0:
            faults.corrupt -= 1
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        body = data[start or 0 :]
        self.send_response(206 if start is not None else 200)
        for name, value in headers.items():
            self.send_header(name, value)
        if start is not None:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self._write_body(body, offset=start or 0, total=len(data), faults=faults)

    def _write_body(self, body: bytes, *, offset: int, total: int, faults: Faults | None) -> None:
        if faults is None:
            self.wfile.write(body)
            return
        at = (total // 2 if faults.at is None else faults.at) - offset
        if 0 < at < len(body) and (faults.drops > 0 or faults.stalls > 0):
            self.wfile.write(body[:at])
            if faults.drops > 0:
                faults.drops -= 1
                self.close_connection = True
                return  # the connection closes with the body half sent
            faults.stalls -= 1
            time.sleep(faults.stall_seconds)
            body = body[at:]
        for i in range(0, len(body), 64 * 1024):
            self.wfile.write(body[i : i + 64 * 1024])
            if faults.chunk_delay:
                time.sleep(faults.chunk_delay)


def _range_start(header: str | None) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-\d*", (header or "").strip())
    return int(match.group(1)) if match else None
