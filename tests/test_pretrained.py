"""GPT2.from_pretrained end to end through a loopback fake of the hub (tests/fakehub.py): the short
name resolves, the checkpoint lands in the hub cache once, loads offline afterwards, carries the
repo's tokenizer, and transformers loads the same cached checkpoint with HF_HUB_OFFLINE=1."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakehub import FakeHub

from gpt2np import GPT2, download, hub

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-gpt2"
TOKENIZER = ("vocab.json", "merges.txt")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "TIMEOUT", (2.0, 5.0))
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        # The fixture's own tokenizer (GPT-2's first 743 merges: its vocabulary is 1000 ids), not the bundled one.
        files = {name: (FIXTURE / name).read_bytes() for name in ("config.json", "model.safetensors", *TOKENIZER)}
        fake.add_repo("openai-community/gpt2", files)
        yield fake


def test_short_name_downloads_once_then_loads_offline(fake_hub, tmp_path):
    ids = np.load(FIXTURE / "reference.npz")["ids"]
    expected = GPT2.from_pretrained(FIXTURE)(ids)
    model = GPT2.from_pretrained("gpt2", progress=False)
    np.testing.assert_array_equal(model(ids), expected)
    assert model.tokenizer.n_vocab == 1000 and model.tokenizer.encode("hello world") == [258, 297, 78, 995]
    weights_gets = lambda: len(fake_hub.seen(host="cdn", method="GET"))  # noqa: E731  (large files come from the CDN)
    assert weights_gets() == 1
    again = GPT2.from_pretrained("gpt2", offline=True)
    np.testing.assert_array_equal(again(ids), expected)
    GPT2.from_pretrained("openai-community/gpt2", progress=False)
    assert weights_gets() == 1, "the cached blob is reused"


def test_unknown_repo_and_offline_miss_are_clear(fake_hub):
    with pytest.raises(hub.RepositoryNotFoundError, match="nobody/nothing"):
        GPT2.from_pretrained("nobody/nothing", progress=False)
    with pytest.raises(hub.OfflineCacheMissError, match="gpt2-medium"):
        GPT2.from_pretrained("gpt2-medium", offline=True)


def test_transformers_loads_what_gpt2np_downloaded(fake_hub, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    GPT2.from_pretrained("gpt2", progress=False)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": os.environ["HF_HUB_CACHE"],
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    code = (
        "import json, sys, numpy as np, torch\n"
        "from transformers import GPT2LMHeadModel\n"
        "m = GPT2LMHeadModel.from_pretrained('openai-community/gpt2').eval()\n"
        "ids = torch.tensor(np.load(sys.argv[1])['ids'])\n"
        "with torch.no_grad(): np.save(sys.argv[2], m(ids).logits.numpy())\n"
    )
    out = tmp_path / "logits.npy"
    run = subprocess.run(
        [sys.executable, "-c", code, str(FIXTURE / "reference.npz"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    reference = np.load(FIXTURE / "reference.npz")
    np.testing.assert_allclose(np.load(out), reference["logits"], rtol=0, atol=1e-5 * np.abs(reference["logits"]).max())


def test_repo_ids_with_dots_go_to_the_hub_and_paths_do_not(fake_hub):
    with pytest.raises(hub.RepositoryNotFoundError, match="someone/gpt2-1.5b"):
        GPT2.from_pretrained("someone/gpt2-1.5b", progress=False)
    with pytest.raises(ValueError, match="no checkpoint folder"):
        GPT2.from_pretrained("./not/a/folder")
