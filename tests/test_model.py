"""The forward pass and checkpoint loading: parity with transformers, invariants, bad files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from checkpoints import hf_logits, hf_reference, worst_relative_error, write_checkpoint, write_tokenizer

from gpt2np import GPT2, GPT2Config, Tokenizer
from gpt2np.checkpoint import check_tokenizer, random_state_dict, save_checkpoint
from gpt2np.model import attention, block, causal_mask, ffn, gelu, gpt2, layer_norm, linear, lm_head, mha, softmax

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-gpt2"
TOLERANCE = 1e-5  # max |ours - reference| / max |reference|, logits in float32


# ------------------------------------------------------------------------------- parity with transformers
PARITY_CASES = {
    # name: (config, layout, dtype, shards, sequence length)
    "gpt2-full-context": (GPT2Config.preset("gpt2"), "transformers", "F32", 1, 1024),
    "gpt2-openai-layout": (GPT2Config.preset("gpt2"), "openai", "F32", 1, 64),
    "wide-8-heads-sharded": (
        GPT2Config(n_layer=3, n_head=8, n_embd=256, n_ctx=300, vocab_size=5000),
        "openai",
        "F32",
        3,
        300,
    ),
    "odd-tiny": (
        GPT2Config(n_layer=1, n_head=3, n_embd=12, n_ctx=7, vocab_size=17, n_inner=20),
        "transformers",
        "F32",
        1,
        7,
    ),
    "f16": (GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64, vocab_size=1000), "openai", "F16", 1, 64),
    "bf16": (GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64, vocab_size=1000), "transformers", "BF16", 2, 64),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_logits_match_transformers(tmp_path, case):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    config, layout, dtype, shards, T = PARITY_CASES[case]
    folder = write_checkpoint(tmp_path, config, layout=layout, dtype=dtype, shard_count=shards, seed=1)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, T))
    reference = hf_logits(hf_reference(folder), ids)
    ours = GPT2.from_pretrained(folder)(ids)
    assert ours.dtype == np.float32 and ours.shape == (2, T, config.vocab_size)
    error = worst_relative_error(ours, reference)
    print(f"{case}: worst relative difference {error:.2e} (tolerance {TOLERANCE:.0e})")
    assert error <= TOLERANCE


def test_logits_match_committed_fixture():
    """Parity that needs no torch: logits transformers produced for the committed tiny checkpoint
    (regenerate with scripts/make_fixture.py)."""
    reference = np.load(FIXTURE / "reference.npz")
    ours = GPT2.from_pretrained(FIXTURE)(reference["ids"])
    error = worst_relative_error(ours, reference["logits"])
    print(f"fixture: worst relative difference {error:.2e}")
    assert error <= TOLERANCE


# ------------------------------------------------------------------------------- invariants
@pytest.fixture(scope="module")
def small():
    return GPT2.from_random(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64, vocab_size=300), seed=3, std=0.1)


def test_batch_equals_rows_alone(small):
    ids = np.random.default_rng(1).integers(0, 300, size=(4, 40))
    batch = small(ids)
    for b in range(4):
        np.testing.assert_allclose(batch[b], small(ids[b]), rtol=0, atol=1e-5 * np.abs(batch).max())


def test_prefix_logits_do_not_depend_on_what_follows(small):
    ids = np.random.default_rng(2).integers(0, 300, size=50)
    full = small(ids)
    other = ids.copy()
    other[20:] = np.random.default_rng(3).integers(0, 300, size=30)
    np.testing.assert_allclose(small(other)[:20], full[:20], rtol=0, atol=1e-5 * np.abs(full).max())
    np.testing.assert_allclose(small(ids[:20]), full[:20], rtol=0, atol=1e-5 * np.abs(full).max())


def test_kv_cache_equals_full_forward(small):
    """Feeding a sequence in chunks through the KV cache gives the logits of one full pass."""
    config, params = small.config, small.params
    ids = np.random.default_rng(4).integers(0, 300, size=(2, 30))
    full = small(ids)
    cache = np.empty((config.n_layer, 2, 2, config.n_head, 30, config.n_embd // config.n_head), np.float32)
    valid = np.ones((2, 30), dtype=bool)
    start = 0
    for chunk in (10, 1, 1, 7, 11):
        T = chunk
        positions = np.broadcast_to(np.arange(start, start + T), (2, T))
        mask = causal_mask(valid[:, : start + T], start, T)
        x = gpt2(ids[:, start : start + T], positions, params, config, mask=mask, kv_cache=cache, start=start)
        np.testing.assert_allclose(
            lm_head(x, small.lm_head_weight), full[:, start : start + T], rtol=0, atol=1e-5 * np.abs(full).max()
        )
        start += T


def test_everything_stays_float32(small):
    logits = small(np.arange(10))
    assert logits.dtype == np.float32
    x = np.ones((2, 3, 8), np.float32)
    assert gelu(x).dtype == layer_norm(x, np.ones(8, np.float32), np.zeros(8, np.float32), 1e-5).dtype == np.float32


def test_shapes_the_comments_claim(small):
    """Each function's shape comment, checked: B=2, T=3, S=5, C=64, H=4, D=16, F=256, V=300."""
    B, T, S, C, H, D, F, V = 2, 3, 5, 64, 4, 16, 256, 300
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, C), dtype=np.float32)
    p = small.params["h"][0]
    assert gelu(rng.standard_normal((B, T, F), dtype=np.float32)).shape == (B, T, F)
    assert layer_norm(x, **p["ln_1"], eps=1e-5).shape == (B, T, C)
    assert linear(x, **p["mlp"]["c_fc"]).shape == (B, T, F)
    assert softmax(rng.standard_normal((B, H, T, S), dtype=np.float32)).shape == (B, H, T, S)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for shape in [(B, H, T, D), (B, H, S, D), (B, H, S, D)])
    mask = causal_mask(np.ones((B, S), bool), S - T, T)
    assert mask.shape == (B, 1, T, S)
    assert attention(q, k, v, mask).shape == (B, H, T, D)
    assert mha(
        x, **p["attn"], n_head=H, scale=1 / math.sqrt(D), mask=causal_mask(np.ones((B, T), bool), 0, T)
    ).shape == (B, T, C)
    assert ffn(x, **p["mlp"]).shape == (B, T, C)
    assert block(x.copy(), p, n_head=H, eps=1e-5, scale=0.25, mask=None).shape == (B, T, C)
    ids = rng.integers(0, V, size=(B, T))
    h = gpt2(
        ids,
        np.broadcast_to(np.arange(T), (B, T)),
        small.params,
        small.config,
        mask=causal_mask(np.ones((B, T), bool), 0, T),
    )
    assert h.shape == (B, T, C)
    assert lm_head(h, small.lm_head_weight).shape == (B, T, V)
    assert small(ids[0]).shape == (T, V)


def test_gelu_is_gpt2s_tanh_formula_without_overflow_warnings():
    """gelu computes x / (1 + exp(-2u)); it must equal GPT-2's 0.5 x (1 + tanh(u)), evaluated in
    float64, everywhere, including where exp overflows (large negative x) without a warning."""
    x = np.concatenate([np.linspace(-12, 12, 4801), [-1e4, -100, -30, 0.0, 30, 100, 1e4]]).astype(np.float32)
    with np.errstate(all="raise"):
        y = gelu(x.copy())
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        reference = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    error = np.abs(y - reference) / np.maximum(np.abs(x64), 1)
    print(f"gelu worst |error| / max(|x|, 1): {error.max():.2e}")
    assert y.dtype == np.float32 and np.isfinite(y).all()
    assert error.max() <= 1e-6
    assert np.all(y[x < -30] <= 0) and np.all(y[x < -30] > -1e-30)  # the limit 0, from below


def test_softmax_of_fully_masked_row_is_finite():
    q = np.ones((1, 1, 1, 4), np.float32)
    k = v = np.ones((1, 1, 3, 4), np.float32)
    out = attention(q, k, v, np.zeros((1, 1, 1, 3), bool))
    assert np.isfinite(out).all()


# ------------------------------------------------------------------------------- bad input to the model
def test_bad_ids(small):
    for ids, message in [
        ([300], "outside the vocabulary"),
        ([-1], "outside the vocabulary"),
        (np.zeros(65, int), "longer than the context"),
        ([], "T >= 1"),
        (np.zeros((1, 2, 3), int), r"shape \[T\] or \[B, T\]"),
        ([0.5, 1.0], "integer token ids"),
        ([[1, 2], [3]], "rectangular"),
    ]:
        with pytest.raises(ValueError, match=message):
            small(ids)


# ------------------------------------------------------------------------------- config
def test_config_validation_and_presets():
    assert GPT2Config.preset("gpt2-xl").n_embd == 1600
    assert GPT2Config.preset("distilgpt2").n_layer == 6
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        GPT2Config(activation_function="relu")
    with pytest.raises(ValueError, match="unknown preset"):
        GPT2Config.preset("gpt3")
    c = GPT2Config.from_dict(
        {
            "n_positions": 512,
            "n_ctx": 512,
            "n_embd": 64,
            "n_head": 4,
            "n_layer": 2,
            "n_inner": None,
            "eos_token_id": 50256,
            "unknown_key": 1,
        }
    )
    assert (c.n_ctx, c.mlp_width, c.head_size) == (512, 256, 16)
    with pytest.raises(ValueError, match="model_type"):
        GPT2Config.from_dict({"model_type": "llama"})


BAD_CONFIG_VALUES = [
    ("eos_token_id", -7, r"eos_token_id must be an integer in \[0, vocab_size=50257\), got -7"),
    ("bos_token_id", 10**9, r"bos_token_id must be an integer in \[0, vocab_size=50257\), got 1000000000"),
    ("bos_token_id", "x", r"bos_token_id must be an integer .* got 'x'"),
    ("eos_token_id", True, r"eos_token_id must be an integer .* got True"),
    ("eos_token_id", 50256.0, r"eos_token_id must be an integer .* got 50256.0"),
    ("eos_token_id", 50257, r"eos_token_id must be an integer in \[0, vocab_size=50257\)"),
    ("layer_norm_epsilon", True, "layer_norm_epsilon must be a finite number > 0"),
    ("layer_norm_epsilon", math.inf, "layer_norm_epsilon must be a finite number > 0 .* got inf"),
    ("layer_norm_epsilon", math.nan, "layer_norm_epsilon must be a finite number > 0 .* got nan"),
    ("layer_norm_epsilon", 0.0, "layer_norm_epsilon must be a finite number > 0"),
    ("layer_norm_epsilon", -1e-5, "layer_norm_epsilon must be a finite number > 0"),
    ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon must be a finite number > 0"),
    ("n_inner", True, "n_inner must be a positive integer or null, got True"),
    ("n_layer", 2.0, "n_layer must be a positive integer, got 2.0"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
]


@pytest.mark.parametrize("field, value, message", BAD_CONFIG_VALUES)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config(**{field: value})
    with pytest.raises(ValueError, match=message):  # config.json goes through the same checks
        GPT2Config.from_dict({field: value})


def test_config_token_ids_follow_the_vocabulary():
    assert (GPT2Config().eos_token_id, GPT2Config().bos_token_id) == (50256, 50256)
    assert GPT2Config(vocab_size=50304).eos_token_id == 50256  # a padded vocabulary keeps <|endoftext|>
    small = GPT2Config(vocab_size=300)  # too small for 50256: its last id, so the embedding can look it up
    assert (small.eos_token_id, small.bos_token_id) == (299, 299)
    assert GPT2Config.from_dict({"vocab_size": 32, "eos_token_id": None}).eos_token_id == 31
    assert GPT2Config.from_dict({"vocab_size": 32, "bos_token_id": [5, 6]}).bos_token_id == 5
    assert GPT2Config(vocab_size=10, eos_token_id=0, bos_token_id=9, layer_norm_epsilon=1).layer_norm_epsilon == 1
    assert GPT2Config.from_dict(small.to_dict()) == small
    with pytest.raises(ValueError, match=r"eos_token_id must be an integer in \[0, vocab_size=1000\), got 50256"):
        GPT2Config(vocab_size=1000, eos_token_id=50256)


# ------------------------------------------------------------------------------- config against tokenizer
@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return Tokenizer()


def test_check_tokenizer_accepts_matching_and_padded_vocabularies(gpt2_tokenizer):
    check_tokenizer(GPT2Config(), gpt2_tokenizer)
    check_tokenizer(GPT2Config(vocab_size=50304), gpt2_tokenizer)  # padded: the extra rows are never sampled
    check_tokenizer(GPT2Config(vocab_size=50304, eos_token_id=198, bos_token_id=0), gpt2_tokenizer)
    tiny = Tokenizer({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}, [("a", "b")])
    check_tokenizer(GPT2Config(vocab_size=4), tiny)


def test_check_tokenizer_rejects_a_vocabulary_smaller_than_the_tokenizers(gpt2_tokenizer):
    message = r"vocab_size 1000 but the tokenizer has 50257 tokens.*ids 1000\.\.50256.*vocab\.json/merges\.txt"
    with pytest.raises(ValueError, match=message):
        check_tokenizer(GPT2Config(vocab_size=1000), gpt2_tokenizer)
    with pytest.raises(ValueError, match="vocab_size 50256 but the tokenizer has 50257"):
        check_tokenizer(GPT2Config(vocab_size=50256, eos_token_id=0, bos_token_id=0), gpt2_tokenizer)


def test_check_tokenizer_rejects_eos_and_bos_the_tokenizer_cannot_decode(gpt2_tokenizer):
    message = r"eos_token_id 50269 is not a token of the tokenizer \(50257 ids, <\|endoftext\|> = 50256\)"
    with pytest.raises(ValueError, match=message):
        check_tokenizer(GPT2Config(vocab_size=50304, eos_token_id=50269), gpt2_tokenizer)
    with pytest.raises(ValueError, match="bos_token_id 50300 is not a token"):
        check_tokenizer(GPT2Config(vocab_size=50304, bos_token_id=50300), gpt2_tokenizer)
    holes = Tokenizer({"a": 0, "b": 1, "<|endoftext|>": 3}, [])  # id 2 is unused: it decodes to nothing
    with pytest.raises(ValueError, match=r"eos_token_id 2 is not a token of the tokenizer \(4 ids"):
        check_tokenizer(GPT2Config(vocab_size=4, eos_token_id=2), holes)


# ------------------------------------------------------------------------------- bad files
@pytest.fixture()
def folder(tmp_path):
    return write_checkpoint(
        tmp_path / "ckpt", GPT2Config(n_layer=2, n_head=2, n_embd=8, n_ctx=16, vocab_size=50), layout="openai"
    )


def _rewrite(folder, change):
    from safetensors.numpy import load_file, save_file

    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, str(folder / "model.safetensors"))


def test_buffers_are_dropped_but_c_attn_bias_is_kept(folder):
    model = GPT2.from_pretrained(folder)
    assert model.params["h"][1]["attn"]["c_attn"]["bias"].shape == (24,)
    assert "bias" not in model.params["h"][1]["attn"]


def test_missing_tensor_is_named(folder):
    _rewrite(folder, lambda s: s.pop("h.1.attn.c_attn.bias"))
    with pytest.raises(ValueError, match=r"missing tensors: h\.1\.attn\.c_attn\.bias"):
        GPT2.from_pretrained(folder)


def test_unexpected_tensor_is_named(folder):
    _rewrite(folder, lambda s: s.update({"h.0.mlp.extra": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: h\.0\.mlp\.extra"):
        GPT2.from_pretrained(folder)


def test_wrong_shape_is_named(folder):
    _rewrite(folder, lambda s: s.update({"h.0.ln_1.weight": np.zeros(9, np.float32)}))
    with pytest.raises(ValueError, match=r"wrong shapes: h\.0\.ln_1\.weight \(9,\) \(expected \(8,\)\)"):
        GPT2.from_pretrained(folder)


def test_config_that_disagrees_with_weights(folder):
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing tensors: h\.2\."):
        GPT2.from_pretrained(folder)


def test_not_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        GPT2.from_pretrained(folder)


def test_truncated_file(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        GPT2.from_pretrained(folder)


def test_header_that_lies_about_sizes(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["wte.weight"]["shape"] = [51, 8]  # more numbers than its byte range holds
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        GPT2.from_pretrained(folder)


def test_missing_files(tmp_path, folder):
    with pytest.raises(ValueError, match="no checkpoint folder"):
        GPT2.from_pretrained(tmp_path / "nowhere")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        GPT2.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        GPT2.from_pretrained(folder)


def test_bad_config_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the config"):
        GPT2.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"n_embd": 10, "n_head": 3}))
    with pytest.raises(ValueError, match="divisible"):
        GPT2.from_pretrained(folder)


def test_sharded_index_naming_a_missing_shard(tmp_path):
    folder = write_checkpoint(
        tmp_path, GPT2Config(n_layer=2, n_head=2, n_embd=8, n_ctx=16, vocab_size=50), shard_count=2
    )
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        GPT2.from_pretrained(folder)


def test_bundled_tokenizer_is_the_fallback_and_folder_tokenizer_wins(tmp_path):
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, n_ctx=16, vocab_size=50257)
    save_checkpoint(tmp_path, config, random_state_dict(config))
    assert GPT2.from_pretrained(tmp_path).tokenizer.n_vocab == 50257
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict() | {"eos_token_id": 3, "bos_token_id": 3}))
    tok = GPT2.from_pretrained(tmp_path).tokenizer
    assert tok.encode("ab") == [2] and tok.eot_token == 3


def test_a_tokenizer_the_model_cannot_serve_fails_at_load(tmp_path):
    """A vocab_size below the tokenizer's (here the bundled 50257) fails at load, naming both numbers."""
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, n_ctx=16, vocab_size=1000)
    save_checkpoint(tmp_path, config, random_state_dict(config))
    with pytest.raises(ValueError, match=r"vocab_size 1000 but the tokenizer has 50257 tokens"):
        GPT2.from_pretrained(tmp_path)


def test_save_and_load_round_trip(tmp_path):
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, n_ctx=8, vocab_size=20)
    state = random_state_dict(config, seed=5)
    save_checkpoint(tmp_path, config, state)
    write_tokenizer(tmp_path, config.vocab_size)
    model = GPT2.from_pretrained(tmp_path)
    np.testing.assert_array_equal(model.params["h"][0]["mlp"]["c_proj"]["weight"], state["h.0.mlp.c_proj.weight"])
    assert model.config == config
