"""gpt2np.download, the one download path, as evaluate's LAMBADA download uses it: no network.

The test file is served the way the hub serves a dataset file: `{HF_ENDPOINT}/datasets/{repo}/resolve/...`
redirects to a CDN on another host, which honours `Range` and can be made to misbehave (tests/fakehub.py).
"""

import pathlib
import random
import socket
import threading

import pytest
from fakehub import FakeHub, sha256

from gpt2np import download, evaluate

DATASET = "datasets/EleutherAI/lambada_openai"
PATH = "data/lambada_test.jsonl"
BODY = random.Random(0).randbytes(300_000)  # > 4 network chunks, so a cut body resumes mid-file
FILENAME = "lambada_test.jsonl"


@pytest.fixture
def fake(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    monkeypatch.setattr(download, "TIMEOUT", (2.0, 5.0))
    monkeypatch.setattr(download, "RETRY_BACKOFF", 0.0)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        hub.add_repo(DATASET, {PATH: BODY}, lfs_suffixes=(".jsonl",))
        yield hub


def hub_url(path: str = PATH) -> str:
    return evaluate.data._hub_dataset_url("EleutherAI/lambada_openai", "main", path)


def source(*urls: str) -> evaluate.DataSource:
    return evaluate.DataSource(FILENAME, sha256(BODY), len(BODY), urls or (hub_url(),))


def fetch(cache: pathlib.Path, *urls: str, **options) -> pathlib.Path:
    return evaluate.download(source(*urls), cache_dir=cache, progress=False, **options)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listing(cache: pathlib.Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# --- the happy path --------------------------------------------------------------------------------


def test_dataset_url_follows_hf_endpoint_and_the_redirect_to_the_cdn(fake, tmp_path):
    assert hub_url().startswith(fake.endpoint + "/datasets/EleutherAI/lambada_openai/resolve/main/")
    path = fetch(tmp_path)
    assert path == tmp_path / FILENAME and path.read_bytes() == BODY
    assert len(fake.seen("hub", "GET")) == 1 and len(fake.seen("cdn", "GET")) == 1
    assert listing(tmp_path) == [FILENAME]  # no partial file, no lock file left behind


def test_cached_copy_is_read_without_any_request(fake, tmp_path):
    fetch(tmp_path)
    before = len(fake.requests)
    assert fetch(tmp_path).read_bytes() == BODY
    assert len(fake.requests) == before


# --- resuming --------------------------------------------------------------------------------------


def test_dropped_connection_is_resumed_with_a_range_request(fake, tmp_path):
    fake.faults.drops = 1
    assert fetch(tmp_path).read_bytes() == BODY
    first, second = fake.seen("cdn", "GET")
    assert "range" not in first.headers
    resumed_from = int(second.headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= len(BODY) // 2
    assert listing(tmp_path) == [FILENAME]


def test_interrupted_download_resumes_on_the_next_call(fake, tmp_path, monkeypatch):
    fake.faults.drops = 1
    monkeypatch.setattr(download, "DOWNLOAD_RETRIES", 0)
    with pytest.raises(OSError, match="next call resumes.*pass --data FILE"):
        fetch(tmp_path)
    assert listing(tmp_path) == [FILENAME + ".incomplete"]  # kept; nothing in place yet
    kept = (tmp_path / (FILENAME + ".incomplete")).stat().st_size
    assert 0 < kept < len(BODY)

    assert fetch(tmp_path).read_bytes() == BODY

    assert fake.seen("cdn", "GET")[-1].headers["range"] == f"bytes={kept}-"
    assert listing(tmp_path) == [FILENAME]


# --- offline ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_hf_hub_offline_refuses_to_download_and_names_the_fixes(fake, tmp_path, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(download.OfflineError) as raised:
        fetch(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and FILENAME in message and f"HF_HUB_OFFLINE={value}" in message
    assert "pass --data FILE" in message and "unset HF_HUB_OFFLINE" in message
    assert fake.requests == [] and listing(tmp_path) == []


def test_offline_argument_names_its_own_undo(fake, tmp_path):
    with pytest.raises(OSError, match=r"offline=True.*pass --data FILE, or pass offline=False"):
        fetch(tmp_path, offline=True)
    assert fake.requests == []


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_hf_hub_offline_off_downloads(fake, tmp_path, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert fetch(tmp_path).read_bytes() == BODY


def test_offline_mode_still_reads_the_cache(fake, tmp_path, monkeypatch):
    fetch(tmp_path)
    before = len(fake.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch(tmp_path).read_bytes() == BODY
    assert len(fake.requests) == before


# --- checksums -------------------------------------------------------------------------------------


def test_sha256_mismatch_leaves_nothing_in_place(fake, tmp_path):
    fake.faults.corrupt = 1  # one byte flipped: the size is right, the sha256 is not
    with pytest.raises(OSError, match=r"sha256 mismatch.*pass --data FILE"):
        fetch(tmp_path)
    assert listing(tmp_path) == []  # no file, no partial, no lock
    assert fetch(tmp_path).read_bytes() == BODY  # the next call starts afresh


def test_wrong_size_leaves_nothing_in_place(fake, tmp_path):
    short = evaluate.DataSource(FILENAME, sha256(BODY), len(BODY) + 1, (hub_url(),))
    with pytest.raises(OSError, match=f"{len(BODY)} bytes where {len(BODY) + 1} were announced"):
        evaluate.download(short, cache_dir=tmp_path, progress=False)
    assert listing(tmp_path) == []


# --- several URLs ----------------------------------------------------------------------------------


def test_falls_through_to_the_second_url(fake, tmp_path):
    missing = hub_url("data/missing.jsonl")  # the hub answers 404 EntryNotFound
    assert fetch(tmp_path, missing, hub_url()).read_bytes() == BODY
    assert [r.path for r in fake.seen("hub", "GET")] == [
        "/datasets/EleutherAI/lambada_openai/resolve/main/data/missing.jsonl",
        "/datasets/EleutherAI/lambada_openai/resolve/main/data/lambada_test.jsonl",
    ]


def test_an_unreachable_mirror_is_retried_then_skipped(fake, tmp_path):
    dead = f"http://127.0.0.1:{unused_port()}/lambada_test.jsonl"
    assert fetch(tmp_path, dead, hub_url()).read_bytes() == BODY
    assert listing(tmp_path) == [FILENAME]


def test_every_failing_url_is_named_in_one_line(fake, tmp_path):
    dead = f"http://127.0.0.1:{unused_port()}/lambada_test.jsonl"
    missing = hub_url("data/missing.jsonl")
    with pytest.raises(OSError) as raised:
        fetch(tmp_path, missing, dead)
    message = str(raised.value)
    assert "\n" not in message and missing in message and dead in message
    assert "HTTP 404" in message and "Could not reach" in message
    assert message.endswith("Check the network, or download it by hand and pass --data FILE.")


# --- the lock --------------------------------------------------------------------------------------


def test_two_threads_share_one_transfer(fake, tmp_path):
    fake.faults.chunk_delay = 0.05  # about 0.25 s per transfer, so the threads overlap
    start = threading.Barrier(2)
    results, errors = [], []

    def worker():
        start.wait()
        try:
            results.append(fetch(tmp_path))
        except OSError as error:  # collected, so a failure shows in the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert errors == [] and results == [tmp_path / FILENAME] * 2
    assert (tmp_path / FILENAME).read_bytes() == BODY
    assert len(fake.seen("cdn", "GET")) == 1  # the second waited on the lock, then found the file
    assert listing(tmp_path) == [FILENAME]


def test_a_lock_file_removed_by_its_holder_still_excludes(tmp_path):
    """`remove=True` deletes the lock file while it is held; a waiter must not then hold a stale one."""
    lock, inside, overlaps = tmp_path / "x.lock", [], []

    def worker():
        for _ in range(20):
            with download.file_lock(lock, remove=True):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                threading.Event().wait(0.001)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert overlaps == [] and not lock.exists()


# --- the hub and the datasets share it -------------------------------------------------------------


def test_offline_mode_reads_hf_hub_offline_like_huggingface_hub(monkeypatch):
    for value, expected in [("1", True), ("ON", True), (" yes ", True), ("true", True), ("0", False), ("", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert download.offline_mode() is expected, value
    assert download.offline_mode(False) is False and download.offline_mode(True) is True


def test_endpoint_is_read_at_each_call(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1/")
    assert download.endpoint() == "http://127.0.0.1:1"
    monkeypatch.delenv("HF_ENDPOINT")
    assert download.endpoint() == download.DEFAULT_ENDPOINT
