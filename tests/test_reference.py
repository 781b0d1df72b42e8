"""The fast code equals the textbook code of gpt2np/reference.py.

Each test states its tolerance and prints the worst difference it saw (pytest -s shows it; on a
failure pytest shows it anyway). Element-wise functions are compared with the reference evaluated
in float64 on the same float32 inputs; the forward pass with the reference run on the same
float32 parameters, as a reader would run it.
"""

import ast
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoints import worst_relative_error
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer import EDGE_CASES, stdlib_prose, stdlib_source

from gpt2np import GPT2, GPT2Config, Tokenizer, model, reference
from gpt2np.checkpoint import random_state_dict, unflatten

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-gpt2"
LOGITS_TOLERANCE = 1e-5  # max |fast - reference| / max |reference|, as for the parity with transformers


def report(name, error, tolerance):
    print(f"{name}: worst difference {error:.2e} (tolerance {tolerance:.0e})")
    assert error <= tolerance, f"{name}: worst difference {error:.2e} exceeds {tolerance:.0e}"


# ------------------------------------------------------------------------------- element-wise functions
def test_gelu():
    """model.gelu's x / (1 + exp(-2u)) equals the tanh formula in float64 over a wide range."""
    x = np.concatenate([np.linspace(-12, 12, 4801), [-1e4, -100, -30, 0.0, 30, 100, 1e4]]).astype(np.float32)
    fast = model.gelu(x.copy())
    textbook = reference.gelu(x.astype(np.float64))
    error = np.abs(fast - textbook) / np.maximum(np.abs(x), 1)  # relative for large |x|, absolute near 0
    report("gelu |fast - reference| / max(|x|, 1)", error.max(), 1e-6)


def test_softmax():
    scores = 30 * np.random.default_rng(0).standard_normal((3, 5, 300), dtype=np.float32)
    scores[:, :, 250:] = model.MASKED  # masked keys, as model.attention writes them
    textbook = reference.softmax(scores.astype(np.float64))
    before = scores.copy()
    reference.softmax(scores)
    assert np.array_equal(scores, before), "reference.softmax must not write into its argument"
    fast = model.softmax(scores)  # in place
    assert np.all(fast[:, :, 250:] == 0) and np.all(textbook[:, :, 250:] == 0)
    report("softmax max |fast - reference|", np.abs(fast - textbook).max(), 1e-6)


def test_layer_norm():
    rng = np.random.default_rng(1)
    x = (3 + 2 * rng.standard_normal((7, 40, 96))).astype(np.float32)  # off-centre, not unit variance
    weight = (1 + 0.1 * rng.standard_normal(96)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(96)).astype(np.float32)
    fast = model.layer_norm(x, weight, bias, 1e-5)
    textbook = reference.layer_norm(x.astype(np.float64), weight, bias, 1e-5)
    assert fast.dtype == np.float32
    report("layer_norm max |fast - reference|", np.abs(fast - textbook).max(), 5e-6)


# ------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("start, T", [(0, 300), (100, 200)], ids=["prefill", "after-100-cached"])
def test_blockwise_attention_equals_per_head_attention(start, T):
    """model.causal_attention (all heads in one product, blocks of 128 queries) against the
    per-head formula, for T queries at positions start..start+T over S = start + T keys."""
    B, H, D, S = 2, 3, 16, start + T
    rng = np.random.default_rng(2)
    q = rng.standard_normal((B, H, T, D), dtype=np.float32)
    k, v = rng.standard_normal((2, B, H, S, D), dtype=np.float32)
    scale = 1 / math.sqrt(D)
    mask = model.causal_mask(np.ones((B, S), dtype=bool), start, T)  # [B, 1, T, S]
    fast = model.causal_attention(q * scale, k, v, mask, start=start)  # q arrives scaled, as mha passes it
    assert T > 128, "more queries than one block, so the block-wise path runs"
    additive = np.where(np.arange(S) <= np.arange(start, start + T)[:, None], 0, -np.inf)  # [T, S]
    if start == 0:
        assert np.array_equal(additive, reference.causal_mask(T, np.float64))
    textbook = np.empty((B, H, T, D))
    for b in range(B):
        for h in range(H):
            q64, k64, v64 = (a[b, h].astype(np.float64) for a in (q, k, v))
            textbook[b, h] = reference.attention(q64, k64, v64, additive, scale)
    report(f"attention start={start} T={T}: max |fast - reference|", np.abs(fast - textbook).max(), 2e-6)


# ------------------------------------------------------------------------------- the forward pass
FORWARD_CASES = {
    # name: (config, sequence length); 200 and 300 positions run model.py's attention in blocks
    "blocked": (GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=300, vocab_size=500), 300),
    "inverse-layer-idx": (
        GPT2Config(n_layer=3, n_head=2, n_embd=32, n_ctx=200, vocab_size=300, scale_attn_by_inverse_layer_idx=True),
        200,
    ),
    "unscaled-odd-mlp": (
        GPT2Config(n_layer=2, n_head=3, n_embd=24, n_ctx=50, vocab_size=97, n_inner=40, scale_attn_weights=False),
        50,
    ),
    "untied-head": (GPT2Config(n_layer=1, n_head=2, n_embd=16, n_ctx=20, vocab_size=50, tie_word_embeddings=False), 20),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_pass_equals_reference(case):
    config, T = FORWARD_CASES[case]
    params = unflatten(random_state_dict(config, seed=4, std=0.1))
    fast_model = GPT2(config, params)
    ids = np.random.default_rng(5).integers(0, config.vocab_size, size=T)
    fast = fast_model(ids)
    textbook = reference.gpt2(ids, params, config)
    assert textbook.dtype == np.float32 and textbook.shape == (T, config.vocab_size)
    report(
        f"{case}: logits max |fast - reference| / max |reference|",
        worst_relative_error(fast, textbook),
        LOGITS_TOLERANCE,
    )


def test_forward_pass_on_committed_fixture():
    """The committed tiny checkpoint: the reference against the fast code and against the logits
    transformers produced for it (tests/fixtures/tiny-gpt2/reference.npz)."""
    fast_model = GPT2.from_pretrained(FIXTURE)
    fixture = np.load(FIXTURE / "reference.npz")
    for row, ids in enumerate(fixture["ids"]):
        textbook = reference.gpt2(ids, fast_model.params, fast_model.config)
        report(f"fixture row {row}: logits vs fast", worst_relative_error(fast_model(ids), textbook), LOGITS_TOLERANCE)
        report(
            f"fixture row {row}: logits vs transformers",
            worst_relative_error(textbook, fixture["logits"][row]),
            LOGITS_TOLERANCE,
        )


# ------------------------------------------------------------------------------- the tokenizer
@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def varied_text():
    """About 12 KB: prose, Python source, and the tokenizer's edge cases (those short enough for
    the quadratic merge), special-token text included."""
    edge = [text for text in EDGE_CASES if len(text) < 200]
    return stdlib_prose()[100_000:104_000] + stdlib_source()[50_000:54_000] + "\n".join(edge * 10)


def test_encode_equals_reference_on_varied_text(tok):
    text = varied_text()
    assert len(text.encode()) >= 10_000
    fast = tok.encode(text, disallowed_special=())  # the reference reads <|endoftext|> as ordinary text
    textbook = reference.encode(text, tok.encoder, tok.bpe_ranks)
    first = next((i for i, (a, b) in enumerate(zip(fast, textbook)) if a != b), None)
    assert first is None, (
        f"first difference at token {first}: {fast[first : first + 5]} vs {textbook[first : first + 5]}"
    )
    assert len(fast) == len(textbook)
    assert tok.encode("hello world") == reference.encode("hello world", tok.encoder, tok.bpe_ranks) == [31373, 995]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_encode_equals_reference_on_generated_text(tok, text):
    assert tok.encode(text, disallowed_special=()) == reference.encode(text, tok.encoder, tok.bpe_ranks)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("abcdeilnorst'ĠÉé日1 "), min_size=1, max_size=12), max_size=8))
def test_encode_equals_reference_on_generated_words(tok, words):
    text = " ".join(words)
    assert tok.encode(text) == reference.encode(text, tok.encoder, tok.bpe_ranks)


# ------------------------------------------------------------------------------- what the reference imports
def test_reference_imports_no_model_code():
    """reference.py reads alone: numpy, regex, the standard library, and the tokenizer's pattern and
    byte table (gpt2np.tokenizer itself imports nothing of gpt2np)."""
    allowed = {"numpy", "regex", "__future__", *sys.stdlib_module_names}
    for name, relative in [("reference.py", {"tokenizer"}), ("tokenizer.py", set())]:
        tree = ast.parse((Path(reference.__file__).parent / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name.split(".")[0] for alias in node.names]
                assert all(m in allowed for m in modules), f"{name} imports {modules}"
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.module in relative, f"{name} imports gpt2np.{node.module}"
                else:
                    assert node.module.split(".")[0] in allowed, f"{name} imports {node.module}"
