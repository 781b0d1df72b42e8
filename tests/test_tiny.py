"""The small trained model that ships in the package (`tiny`, gpt2np/models/tiny), and what only a
trained model can show: peaked distributions, long greedy runs, real stop strings.

- it loads by name with no network, no cache and no token, and a local folder named `tiny` wins;
- transformers' GPT2LMHeadModel loads the same folder and gives the same logits and greedy ids;
- its held-out perplexity through gpt2np's scoring is the one its model card states;
- top_p and top_k remove tokens that have real probability mass, exactly as transformers' warpers;
- the training script is deterministic (a few steps, twice, the same tensors bit for bit).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2np import GPT2
from gpt2np.locate import BUNDLED
from gpt2np.sampling import GenerationOptions, warp

ROOT = Path(__file__).resolve().parents[1]
FOLDER = BUNDLED["tiny"]
RECORD = json.loads((FOLDER / "training.json").read_text())

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def push(self, item):\n        self.",
    "    for i in range(len(items)):\n",
    '"""Utilities for parsing',
]
MID_LINE = [PROMPTS[1], PROMPTS[2], "for i in range(", "        return self.", "import "]  # broad distributions


def train_script():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return GPT2.from_pretrained("tiny")


@pytest.fixture(scope="module")
def reference():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # The weights are stored in float16; transformers would compute in it. gpt2np upcasts to float32.
    return transformers.GPT2LMHeadModel.from_pretrained(FOLDER, dtype=torch.float32).eval()


def test_tiny_loads_by_name_offline_and_a_local_folder_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    model = GPT2.from_pretrained("tiny")
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (
        RECORD["settings"]["n_layer"],
        RECORD["settings"]["n_embd"],
        50257,
    )
    assert not (tmp_path / "empty-cache").exists()
    local = tmp_path / "tiny"
    local.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no config.json in tiny"):  # the empty local folder is the one read
        GPT2.from_pretrained("tiny")


def test_its_distributions_are_peaked(tiny):
    """A trained model: after `def fibonacci(n):` and a newline, the next token is nearly certain."""
    ids = tiny.tokenizer.encode("def fibonacci(n):\n")
    logits = tiny(np.array(ids))[-1].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert p.max() > 0.5, p.max()  # random weights give about 1 / 50,257


def test_logits_and_200_greedy_tokens_equal_transformers(tiny, reference):
    import torch

    worst = 0.0
    for text in PROMPTS:
        ids = tiny.tokenizer.encode(text)
        ours = tiny.generate_ids([ids], max_new_tokens=200, do_sample=False, ignore_eos=True)[0]
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=200,
                do_sample=False,
                pad_token_id=50256,
                eos_token_id=None,
            )
            expected = out[0, len(ids) :].tolist()
            full = ids + ours
            theirs = reference(torch.tensor([full])).logits[0].numpy()
        assert ours == expected, (
            f"{text!r}: first difference at {next(i for i, (a, b) in enumerate(zip(ours, expected)) if a != b)}"
        )
        worst = max(worst, float(np.abs(tiny(np.array(full)) - theirs).max() / np.abs(theirs).max()))
    print(
        f"worst logit difference (max |ours - theirs| / max |theirs|), {len(PROMPTS)} prompts x 200 tokens: {worst:.2e}"
    )
    assert worst <= 1e-5


def test_held_out_perplexity_is_the_model_cards(tiny):
    """gpt2np's own scoring (the `text` task of `gpt2np eval`) on the held-out `json` package gives
    the figure the training script measured with torch on the same float16 weights, within 0.5%."""
    script = train_script()
    text = script.held_out_text("json")
    import hashlib

    if hashlib.sha256(text.encode()).hexdigest() != RECORD["held_out_sha256"]["json"]:
        pytest.skip(f"this Python's json package is not the one held out (Python {RECORD['python']})")
    from gpt2np.evaluate import perplexity

    stride = RECORD["settings"]["eval_stride"]
    result = perplexity(tiny, text, stride=stride, prepend_eot=True, progress=False)
    stated = RECORD["held_out_ppl"]["json"]
    print(f"held-out json: gpt2np {result['ppl']:.4f}, torch (training script) {stated:.4f}")
    assert abs(result["ppl"] / stated - 1) < 0.005
    assert result["ppl"] < 100  # a uniform guess is 50,257


def test_top_p_and_top_k_remove_real_mass_exactly_as_transformers(tiny):
    """On the model's own logits, the kept set equals transformers' warpers' and what is cut holds
    real probability (not the 1e-5-per-token tail of a random model)."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    cut_mass = []
    for text in MID_LINE:
        logits = tiny(np.array(tiny.tokenizer.encode(text)))[-1]
        for temperature, top_k, top_p in [(1.0, None, 0.9), (0.8, None, 0.5), (1.0, 5, 1.0), (1.2, 20, 0.8)]:
            scores = TemperatureLogitsWarper(temperature)(None, torch.tensor(logits.copy())[None])
            if top_k is not None:
                scores = TopKLogitsWarper(top_k)(None, scores)
            if top_p < 1.0:
                scores = TopPLogitsWarper(top_p)(None, scores)
            expected = torch.isfinite(scores[0]).numpy()
            keep = warp(logits.copy(), GenerationOptions(temperature=temperature, top_k=top_k, top_p=top_p))
            assert (keep == expected).all(), (text, temperature, top_k, top_p)
            z = logits.astype(np.float64) / temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            cut_mass.append(p[~keep].sum())
    print(f"probability removed by the warpers: median {np.median(cut_mass):.3f}, max {max(cut_mass):.3f}")
    assert np.median(cut_mass) > 0.05


def test_a_stop_string_is_met_by_generated_text(tiny):
    """Greedy code reaches a newline: with stop=["\\n"] the continuation ends before it."""
    prompt = PROMPTS[1]
    plain = tiny.generate(prompt, max_new_tokens=60, do_sample=False, return_full_text=False)
    assert "\n" in plain
    stopped = tiny.generate(prompt, max_new_tokens=60, do_sample=False, stop=["\n"], return_full_text=False)
    assert stopped == plain[: plain.index("\n")]
    assert stopped.strip()  # real text came before the stop


def test_stream_pieces_join_to_generate(tiny):
    for seed in range(3):
        pieces = list(tiny.stream(PROMPTS[1], max_new_tokens=80, seed=seed, temperature=0.7))
        assert "".join(pieces) == tiny.generate(PROMPTS[1], max_new_tokens=80, seed=seed, temperature=0.7)
        assert len(pieces) > 10


def test_training_is_deterministic(tmp_path):
    """A few steps of the training script, twice from the same seed: the same tensors bit for bit."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    saved = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = ["--out", str(out), "--steps", "3", "--warmup", "2", "--batch-size", "4", "--eval-every", "1000"]
        argv += ["--eval-tokens", "600", "--compile", "false", "--held-out", "false", "--progress", "false"]
        subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny.py"), *argv], check=True, timeout=600)
        saved.append(load_file(out / "model.safetensors"))
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 50257
    assert saved[0].keys() == saved[1].keys()
    for name in saved[0]:
        assert saved[0][name].dtype == np.float16
        assert np.array_equal(saved[0][name].view(np.uint16), saved[1][name].view(np.uint16)), name
    first = json.loads((tmp_path / "a" / "training.json").read_text())
    assert first["log"][-1]["loss"] < first["log"][0]["loss"]  # three steps already learn something


def test_the_built_wheel_carries_the_model(tmp_path):
    """`pip wheel .` puts the checkpoint, its tokenizer files and its card in the package."""
    import zipfile

    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("gpt2np-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "README.md", "training.json"):
        assert f"gpt2np/models/tiny/{name}" in names, name
    print(f"wheel: {wheel.stat().st_size / 1e6:.1f} MB")
