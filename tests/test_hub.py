"""gpt2np.hub against a loopback fake of the HuggingFace hub (tests/fakehub.py): no network.

The fake hub serves plain bytes; nothing here needs the model code. huggingface_hub, when
installed, is the reference for the cache layout: each tool must find what the other downloaded.
"""

import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import threading

import pytest
from fakehub import FakeHub, git_blob_sha1, sha256

from gpt2np import download as downloads
from gpt2np import hub
from gpt2np.hub import (
    ChecksumError,
    EntryNotFoundError,
    GatedRepoError,
    HubError,
    HubUnreachableError,
    OfflineCacheMissError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "openai-community/gpt2"
FOLDER = "models--openai-community--gpt2"
CONFIG = json.dumps({"n_embd": 8, "n_head": 2, "n_layer": 1, "n_ctx": 16, "vocab_size": 32}).encode()
WEIGHTS = random.Random(0).randbytes(300_000)  # > 4 network chunks, so a cut body resumes mid-file
VOCAB = json.dumps({"a": 0, "b": 1}).encode()
MERGES = b"#version: 0.2\na b\n"
TOKEN = "hf_test_secret"


def gpt2_files(**overrides) -> dict[str, bytes]:
    files = {"config.json": CONFIG, "model.safetensors": WEIGHTS, "vocab.json": VOCAB, "merges.txt": MERGES}
    files.update(overrides)
    return {name: data for name, data in files.items() if data is not None}


def etag_of(name: str, data: bytes) -> str:
    return sha256(data) if name.endswith(".safetensors") else git_blob_sha1(data)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_hub(monkeypatch):
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    monkeypatch.setattr(downloads, "TIMEOUT", (2.0, 5.0))
    monkeypatch.setattr(downloads, "RETRY_BACKOFF", 0.0)
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        yield fake


@pytest.fixture
def cache(tmp_path) -> pathlib.Path:
    return tmp_path / "hub-cache"


def download(cache, name="gpt2", **options) -> pathlib.Path:
    options.setdefault("progress", False)
    return hub.snapshot_download(name, cache_dir=cache, **options)


def leftovers(cache) -> list[pathlib.Path]:
    return list(cache.glob(f"{FOLDER}/blobs/*.incomplete"))


# --- names and folders ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, repo_id",
    [
        ("gpt2", "openai-community/gpt2"),
        ("gpt2-medium", "openai-community/gpt2-medium"),
        ("gpt2-large", "openai-community/gpt2-large"),
        ("gpt2-xl", "openai-community/gpt2-xl"),
        ("distilgpt2", "distilbert/distilgpt2"),
        ("someone/tiny-gpt2", "someone/tiny-gpt2"),
    ],
)
def test_resolve_repo_id(name, repo_id):
    assert hub.resolve_repo_id(name) == repo_id


def test_hub_cache_dir_precedence(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hub.hub_cache_dir() == tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert hub.hub_cache_dir() == tmp_path / "hub-cache"
    assert hub.hub_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


# --- downloading and the cache layout -------------------------------------------------------------


def test_download_lays_out_the_cache_like_huggingface_hub(fake_hub, cache):
    files = gpt2_files()
    repo = fake_hub.add_repo(REPO, files)

    snapshot = download(cache)

    folder = cache / FOLDER
    assert snapshot == folder / "snapshots" / repo.head
    assert (folder / "refs" / "main").read_bytes() == repo.head.encode()  # no newline
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(files)
    for name, data in files.items():
        etag = etag_of(name, data)
        assert (snapshot / name).is_symlink()
        assert os.readlink(snapshot / name) == f"../../blobs/{etag}"
        assert (folder / "blobs" / etag).read_bytes() == data
        assert (snapshot / name).read_bytes() == data
    assert leftovers(cache) == []


def test_sharded_checkpoint_fetches_every_shard(fake_hub, cache):
    shard_1, shard_2 = b"first shard" * 1000, b"second shard" * 1000
    index = {
        "metadata": {"total_size": len(shard_1) + len(shard_2)},
        "weight_map": {
            "wte.weight": "model-00001-of-00002.safetensors",
            "wpe.weight": "model-00001-of-00002.safetensors",
            "h.0.ln_1.weight": "shards/model-00002-of-00002.safetensors",
        },
    }
    files = gpt2_files(**{"model.safetensors": None})
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["model-00001-of-00002.safetensors"] = shard_1
    files["shards/model-00002-of-00002.safetensors"] = shard_2
    fake_hub.add_repo(REPO, files)

    snapshot = download(cache)

    assert not (snapshot / "model.safetensors").exists()
    assert (snapshot / "model-00001-of-00002.safetensors").read_bytes() == shard_1
    nested = snapshot / "shards" / "model-00002-of-00002.safetensors"
    assert os.readlink(nested) == f"../../../blobs/{sha256(shard_2)}"  # one more ../ per subfolder
    assert nested.read_bytes() == shard_2


def test_tokenizer_files_are_optional(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files(**{"vocab.json": None, "merges.txt": None}))
    snapshot = download(cache)
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]


def test_repo_without_safetensors_weights_is_refused(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files(**{"model.safetensors": None, "pytorch_model.bin": b"pickle"}))
    with pytest.raises(EntryNotFoundError, match="no safetensors weights"):
        download(cache)


def test_shard_paths_that_leave_the_repo_are_refused(fake_hub, cache):
    index = {"weight_map": {"wte.weight": "../../escape.safetensors"}}
    index_file = json.dumps(index).encode()
    fake_hub.add_repo(REPO, gpt2_files(**{"model.safetensors": None, "model.safetensors.index.json": index_file}))
    with pytest.raises(HubError, match="not a plain path"):
        download(cache)


def test_second_call_uses_the_cache(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files())
    first = download(cache)
    second = download(cache)
    assert first == second
    assert len(fake_hub.seen("cdn", "GET")) == 1  # the weights were fetched once
    assert len(fake_hub.seen("hub", "GET", "config.json")) == 1


def test_new_commit_on_main_gets_a_new_snapshot_and_reuses_unchanged_blobs(fake_hub, cache):
    repo = fake_hub.add_repo(REPO, gpt2_files())
    old = download(cache)
    new_config = CONFIG.replace(b'"n_layer": 1', b'"n_layer": 2')
    new_commit = fake_hub.push(REPO, gpt2_files(**{"config.json": new_config}))

    new = download(cache)

    assert new == cache / FOLDER / "snapshots" / new_commit != old
    assert (cache / FOLDER / "refs" / "main").read_text() == new_commit
    assert (new / "config.json").read_bytes() == new_config
    assert (old / "config.json").read_bytes() == CONFIG
    assert len(fake_hub.seen("cdn", "GET")) == 1  # same weights, same blob
    assert repo.head == new_commit


def test_commit_hash_revision_writes_no_ref(fake_hub, cache):
    repo = fake_hub.add_repo(REPO, gpt2_files())
    snapshot = download(cache, revision=repo.head)
    assert snapshot.name == repo.head
    assert not (cache / FOLDER / "refs").exists()
    assert download(cache, revision=repo.head, offline=True) == snapshot


def test_branch_with_slash_is_recorded_as_a_nested_ref(fake_hub, cache):
    repo = fake_hub.add_repo(REPO, gpt2_files())
    repo.branches["refs/pr/1"] = repo.head
    download(cache, revision="refs/pr/1")
    assert (cache / FOLDER / "refs" / "refs" / "pr" / "1").read_text() == repo.head


# --- offline and network failures -----------------------------------------------------------------


@pytest.mark.parametrize("env_value", [None, "1", "true", "YES", "on"])
def test_offline_mode_reads_the_cache_only(fake_hub, cache, monkeypatch, env_value):
    fake_hub.add_repo(REPO, gpt2_files())
    snapshot = download(cache)
    requests_before = len(fake_hub.requests)
    if env_value is None:
        found = download(cache, offline=True)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", env_value)
        found = download(cache)
    assert found == snapshot
    assert len(fake_hub.requests) == requests_before


def test_offline_argument_overrides_the_environment(fake_hub, cache, monkeypatch):
    fake_hub.add_repo(REPO, gpt2_files())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download(cache, offline=False).is_dir()


def test_offline_miss_names_the_repo(fake_hub, cache):
    expected = r"HF_HUB_OFFLINE=1.*'openai-community/gpt2' at revision 'main' is not in the cache"
    with pytest.raises(OfflineCacheMissError, match=expected):
        download(cache, offline=True)
    assert fake_hub.requests == []


def test_offline_incomplete_snapshot_names_the_missing_file(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files())
    snapshot = download(cache)
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(OfflineCacheMissError, match="lacks model.safetensors"):
        download(cache, offline=True)


def test_network_failure_falls_back_to_the_cached_snapshot(fake_hub, cache, monkeypatch):
    fake_hub.add_repo(REPO, gpt2_files())
    snapshot = download(cache)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{unused_port()}")
    assert download(cache) == snapshot


def test_network_failure_without_cache_explains_and_suggests_offline(fake_hub, cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(HubUnreachableError, match=r"Could not reach.*'openai-community/gpt2'.*HF_HUB_OFFLINE=1"):
        download(cache)


def test_server_error_falls_back_to_the_cache_too(fake_hub, cache, monkeypatch):
    fake_hub.add_repo(REPO, gpt2_files())
    snapshot = download(cache)

    def broken(handler, send_body):
        handler._error(503, "", "Service unavailable", send_body)

    from fakehub import _Handler

    monkeypatch.setattr(_Handler, "_hub_answer", broken)
    assert download(cache) == snapshot


# --- interrupted, ranged and corrupted transfers --------------------------------------------------


def test_dropped_connection_is_resumed_with_a_range_request(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files())
    fake_hub.faults.drops = 1

    snapshot = download(cache)

    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    first, second = fake_hub.seen("cdn", "GET")
    assert "range" not in first.headers
    resumed_from = int(second.headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= len(WEIGHTS) // 2
    assert leftovers(cache) == []


def test_interrupted_download_resumes_on_the_next_call(fake_hub, cache, monkeypatch):
    fake_hub.add_repo(REPO, gpt2_files())
    fake_hub.faults.drops = 1
    monkeypatch.setattr(downloads, "DOWNLOAD_RETRIES", 0)

    with pytest.raises(HubUnreachableError, match="next call resumes"):
        download(cache)
    [partial] = leftovers(cache)
    kept = partial.stat().st_size
    assert 0 < kept < len(WEIGHTS)
    assert not list(cache.glob(f"{FOLDER}/snapshots/*/model.safetensors"))

    snapshot = download(cache)

    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    assert fake_hub.seen("cdn", "GET")[-1].headers["range"] == f"bytes={kept}-"
    assert leftovers(cache) == []


def test_server_ignoring_the_range_restarts_from_zero(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files())
    fake_hub.faults.drops = 1
    fake_hub.faults.ignore_range = True

    snapshot = download(cache)

    assert "range" in fake_hub.seen("cdn", "GET")[-1].headers  # asked for a range, got the whole file
    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS


def test_stalled_transfer_times_out_and_resumes(fake_hub, cache, monkeypatch):
    fake_hub.add_repo(REPO, gpt2_files())
    fake_hub.faults.stalls = 1
    fake_hub.faults.stall_seconds = 1.0
    monkeypatch.setattr(downloads, "TIMEOUT", (2.0, 0.2))

    snapshot = download(cache)

    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    assert "range" in fake_hub.seen("cdn", "GET")[-1].headers


def test_cdn_server_errors_are_retried(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files())
    fake_hub.faults.server_errors = 2
    snapshot = download(cache)
    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    assert len(fake_hub.seen("cdn", "GET")) == 3


def test_corrupted_bytes_raise_checksum_error_and_leave_nothing_behind(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files())
    fake_hub.faults.corrupt = 1

    with pytest.raises(ChecksumError, match="checksum did not match"):
        download(cache)

    assert not (cache / FOLDER / "blobs" / sha256(WEIGHTS)).exists()
    assert leftovers(cache) == []
    assert not list(cache.glob(f"{FOLDER}/snapshots/*/model.safetensors"))
    # the next attempt downloads afresh
    assert (download(cache) / "model.safetensors").read_bytes() == WEIGHTS


# --- authentication and errors --------------------------------------------------------------------


def test_private_repo_without_token_says_to_set_hf_token(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files(), token=TOKEN)
    with pytest.raises(RepositoryNotFoundError, match=r"'openai-community/gpt2'.*set HF_TOKEN or pass token="):
        download(cache)


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_token_goes_to_the_hub_and_never_to_the_cdn(fake_hub, cache, monkeypatch, via):
    fake_hub.add_repo(REPO, gpt2_files(), token=TOKEN)
    if via == "environment":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        snapshot = download(cache)
    else:
        snapshot = download(cache, token=TOKEN)

    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.seen("hub"))
    assert fake_hub.seen("cdn", "GET")
    assert not any("authorization" in r.headers for r in fake_hub.seen("cdn"))


def test_wrong_token_says_to_check_it(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files(), token=TOKEN)
    with pytest.raises(RepositoryNotFoundError, match="check that your token"):
        download(cache, token="hf_wrong")


def test_gated_repo_without_token_says_to_accept_and_set_hf_token(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files(), token=TOKEN, gated=True)
    with pytest.raises(GatedRepoError, match=r"gated: accept its conditions.*HF_TOKEN"):
        download(cache)


def test_unknown_repo_is_named(fake_hub, cache):
    with pytest.raises(RepositoryNotFoundError, match="'nobody/nothing' was not found"):
        download(cache, "nobody/nothing")


def test_unknown_revision_is_named(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files())
    with pytest.raises(RevisionNotFoundError, match="Revision 'v9' does not exist in 'openai-community/gpt2'"):
        download(cache, revision="v9")


def test_missing_file_is_named(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files(**{"config.json": None}))
    with pytest.raises(EntryNotFoundError, match="File 'config.json' is not in 'openai-community/gpt2'"):
        download(cache)


@pytest.mark.parametrize(
    "error",
    [
        hub.RepositoryNotFoundError,
        hub.RevisionNotFoundError,
        hub.EntryNotFoundError,
        hub.GatedRepoError,
        hub.ChecksumError,
        hub.OfflineCacheMissError,
        hub.HubUnreachableError,
    ],
)
def test_every_error_is_a_hub_error_and_an_os_error(error):
    assert issubclass(error, HubError) and issubclass(error, OSError)


# --- concurrency ----------------------------------------------------------------------------------


def test_concurrent_threads_end_with_one_correct_blob(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files())
    fake_hub.faults.chunk_delay = 0.02  # about 0.1 s per download, so the threads overlap
    start = threading.Barrier(4)
    results, errors = [], []

    def worker():
        start.wait()
        try:
            results.append(download(cache))
        except Exception as error:  # collected, so a failure shows in the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert errors == [] and len(set(results)) == 1
    assert (results[0] / "model.safetensors").read_bytes() == WEIGHTS
    assert len(fake_hub.seen("cdn", "GET")) == 1  # the others waited on the lock, then found the blob
    assert leftovers(cache) == []


def test_concurrent_processes_end_with_one_correct_blob(fake_hub, cache):
    fake_hub.add_repo(REPO, gpt2_files())
    fake_hub.faults.chunk_delay = 0.05
    script = (
        "import sys; from gpt2np import hub; "
        "print(hub.snapshot_download('gpt2', cache_dir=sys.argv[1], progress=False))"
    )
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(cache)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=30)[0].strip() for process in processes]

    assert [process.returncode for process in processes] == [0, 0]
    assert len(set(outputs)) == 1
    assert pathlib.Path(outputs[0], "model.safetensors").read_bytes() == WEIGHTS
    assert len(fake_hub.seen("cdn", "GET")) == 1
    assert leftovers(cache) == []


# --- output ---------------------------------------------------------------------------------------


def test_progress_bar_goes_to_stderr(fake_hub, cache, capfd):
    fake_hub.add_repo(REPO, gpt2_files())
    download(cache, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "model.safetensors" in err and "100%" in err
    assert "config.json" not in err  # one bar per large file only


def test_nothing_is_printed_without_progress(fake_hub, cache, capfd):
    fake_hub.add_repo(REPO, gpt2_files())
    fake_hub.faults.drops = 1
    download(cache, progress=False)
    assert capfd.readouterr() == ("", "")


# --- interoperability with huggingface_hub --------------------------------------------------------


@pytest.fixture
def huggingface_hub(monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    # Its settings are read from the environment at import time: set the ones that matter here.
    for name, value in [("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_XET", True), ("HF_HUB_DISABLE_TELEMETRY", True)]:
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    return hf


def test_snapshot_downloaded_by_huggingface_hub_loads_offline(fake_hub, cache, huggingface_hub):
    files = gpt2_files()
    repo = fake_hub.add_repo(REPO, files)
    for name in files:
        huggingface_hub.hf_hub_download(REPO, name, cache_dir=cache, endpoint=fake_hub.endpoint, token=False)
    assert len(fake_hub.seen("cdn", "GET")) == 1

    snapshot = download(cache, offline=True)

    assert snapshot == cache / FOLDER / "snapshots" / repo.head
    assert all((snapshot / name).read_bytes() == data for name, data in files.items())
    # online, gpt2np finds the blobs huggingface_hub wrote and fetches nothing again
    assert download(cache) == snapshot
    assert len(fake_hub.seen("cdn", "GET")) == 1


def test_huggingface_hub_finds_what_gpt2np_downloaded(fake_hub, cache, huggingface_hub):
    files = gpt2_files()
    fake_hub.add_repo(REPO, files)
    snapshot = download(cache)

    found = huggingface_hub.snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    assert pathlib.Path(found) == snapshot
    for name in files:
        path = huggingface_hub.hf_hub_download(REPO, name, cache_dir=cache, local_files_only=True)
        assert pathlib.Path(path) == snapshot / name
    # online, huggingface_hub finds the blobs gpt2np wrote and fetches nothing again
    huggingface_hub.hf_hub_download(REPO, "model.safetensors", cache_dir=cache, endpoint=fake_hub.endpoint, token=False)
    assert len(fake_hub.seen("cdn", "GET")) == 1
