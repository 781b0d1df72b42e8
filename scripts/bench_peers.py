"""The CPU runtimes a user would pick instead of gpt2np, on the same checkpoint, for scripts/bench.py.

    pip install -e ".[bench]"       # onnxruntime, onnx, ctranslate2 (and torch, transformers: the test extra)

- ONNX Runtime: the checkpoint's decoder exported with torch.onnx (the TorchScript exporter) as one
  graph with a KV cache: input ids, their positions and every layer's past keys and values in; the
  logits of every new position and the present keys and values out. The graph is written below as
  plain tensor operations over the checkpoint's own weights (optimum's exporter pins an older
  transformers, and tracing transformers' GPT2LMHeadModel bakes its mask logic into constants), run
  by ONNX Runtime's CPU provider with every graph optimisation on, in float32.
- CTranslate2: the checkpoint converted by its own `ct2-transformers-converter` (float32), run by
  `Generator.generate_batch` (greedy) and `Generator.forward_batch` (logits of a prefill).

Both are checked before they are timed: their greedy ids must equal gpt2np's on the same prompts.
Nothing here is imported by gpt2np itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

PEERS = ("onnxruntime", "ctranslate2")


def missing(name: str) -> str | None:
    """Why peer `name` cannot run here, or None."""
    modules = {"onnxruntime": ("onnxruntime", "onnx", "torch"), "ctranslate2": ("ctranslate2", "transformers")}[name]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[bench]')"
    return None


# ---------------------------------------------------------------------------------------- ONNX Runtime
def _decoder_module(folder: Path):
    """A torch module computing one GPT-2 pass with a KV cache from the checkpoint's weights."""
    import torch
    from safetensors.torch import load_file

    from gpt2np import GPT2Config

    config = GPT2Config.from_json_file(folder / "config.json")
    raw = load_file(folder / "model.safetensors")
    w = {k.removeprefix("transformer."): v.float() for k, v in raw.items()}
    H, L, C, eps = config.n_head, config.n_layer, config.n_embd, config.layer_norm_epsilon
    D = C // H

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in w.items():
                if not name.endswith((".attn.bias", ".attn.masked_bias")) and name != "lm_head.weight":
                    self.register_buffer(name.replace(".", "_"), value.contiguous())

        def p(self, name):
            return getattr(self, name.replace(".", "_"))

        def forward(self, input_ids, position_ids, *past):  # [B, T], [B, T], 2L x [B, H, P, D]
            B, T = input_ids.shape
            x = self.p("wte.weight")[input_ids] + self.p("wpe.weight")[position_ids]
            P = past[0].shape[2]
            q_pos = torch.arange(T).unsqueeze(1) + P
            k_pos = torch.arange(P + T).unsqueeze(0)
            bias = torch.where(k_pos <= q_pos, 0.0, float("-inf"))  # [T, P + T]
            present = []
            for i in range(L):
                h = f"h.{i}."
                a = torch.nn.functional.layer_norm(x, (C,), self.p(h + "ln_1.weight"), self.p(h + "ln_1.bias"), eps)
                qkv = a @ self.p(h + "attn.c_attn.weight") + self.p(h + "attn.c_attn.bias")
                q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
                k = torch.cat([past[2 * i], k], dim=2)
                v = torch.cat([past[2 * i + 1], v], dim=2)
                present += [k, v]
                scores = (q @ k.transpose(-1, -2)) / (D**0.5) + bias
                z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
                x = x + z @ self.p(h + "attn.c_proj.weight") + self.p(h + "attn.c_proj.bias")
                m = torch.nn.functional.layer_norm(x, (C,), self.p(h + "ln_2.weight"), self.p(h + "ln_2.bias"), eps)
                m = m @ self.p(h + "mlp.c_fc.weight") + self.p(h + "mlp.c_fc.bias")
                m = torch.nn.functional.gelu(m, approximate="tanh")
                x = x + m @ self.p(h + "mlp.c_proj.weight") + self.p(h + "mlp.c_proj.bias")
            x = torch.nn.functional.layer_norm(x, (C,), self.p("ln_f.weight"), self.p("ln_f.bias"), eps)
            return (x @ self.p("wte.weight").T, *present)

    return Decoder().eval(), config


def export_onnx(folder: Path, out: Path) -> Path:
    """The checkpoint's decoder as an ONNX graph with a KV cache (see the module's docstring)."""
    import torch

    module, config = _decoder_module(folder)
    L, H, D = config.n_layer, config.n_head, config.n_embd // config.n_head
    names = [f"past_{i}" for i in range(2 * L)]
    past = [torch.zeros(1, H, 3, D) for _ in names]
    ids, pos = torch.tensor([[1, 2]]), torch.tensor([[3, 4]])
    axes = {"input_ids": {0: "B", 1: "T"}, "position_ids": {0: "B", 1: "T"}, "logits": {0: "B", 1: "T"}}
    axes |= {n: {0: "B", 2: "P"} for n in names} | {f"present_{i}": {0: "B", 2: "S"} for i in range(2 * L)}
    with torch.no_grad():
        torch.onnx.export(
            module,
            (ids, pos, *past),
            str(out),
            input_names=["input_ids", "position_ids", *names],
            output_names=["logits", *[f"present_{i}" for i in range(2 * L)]],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return out


class OnnxDecoder:
    """Greedy decoding and prefill with ONNX Runtime on the exported graph, `threads` intra-op threads."""

    def __init__(self, path: Path, config, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = config

    def _run(self, ids, pos, past):
        feed = {"input_ids": ids, "position_ids": pos} | {f"past_{i}": p for i, p in enumerate(past)}
        logits, *present = self.session.run(None, feed)
        return logits, present

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy ids for equal-length prompts, EOS ignored (as the bench's gpt2np runs)."""
        c = self.config
        B, P = len(prompts), len(prompts[0])
        past = [np.zeros((B, c.n_head, 0, c.n_embd // c.n_head), np.float32) for _ in range(2 * c.n_layer)]
        ids = np.array(prompts, dtype=np.int64)
        pos = np.broadcast_to(np.arange(P, dtype=np.int64), (B, P)).copy()
        out = []
        for step in range(new_tokens):
            logits, past = self._run(ids, pos, past)
            token = logits[:, -1].argmax(-1)
            out.append(token)
            ids, pos = token[:, None].astype(np.int64), np.full((B, 1), P + step, dtype=np.int64)
        return np.stack(out, axis=1).tolist()

    def prefill(self, ids: list[int]) -> np.ndarray:  # [T] -> [T, V]
        c = self.config
        past = [np.zeros((1, c.n_head, 0, c.n_embd // c.n_head), np.float32) for _ in range(2 * c.n_layer)]
        logits, _ = self._run(np.array([ids], dtype=np.int64), np.arange(len(ids), dtype=np.int64)[None], past)
        return logits[0]


# ---------------------------------------------------------------------------------------- CTranslate2
def convert_ct2(folder: Path, out: Path) -> Path:
    """`ct2-transformers-converter` in float32; the converter wants the tokenizer files, so a folder
    without them gets GPT-2's (gpt2np's bundled copies) in a scratch copy."""
    source = folder
    if not (folder / "vocab.json").is_file():
        source = out.parent / "ct2-source"
        shutil.copytree(folder, source, dirs_exist_ok=True)
        vocab = Path(__import__("gpt2np").__file__).parent / "vocab"
        shutil.copyfile(vocab / "encoder.json", source / "vocab.json")
        shutil.copyfile(vocab / "vocab.bpe", source / "merges.txt")
    converter = shutil.which("ct2-transformers-converter") or str(
        Path(sys.executable).parent / "ct2-transformers-converter"
    )
    subprocess.run(
        [converter, "--model", str(source), "--output_dir", str(out), "--quantization", "float32", "--force"],
        check=True,
        capture_output=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    return out


class CT2Decoder:
    """Greedy decoding and prefill with CTranslate2's Generator, `threads` intra-op threads."""

    def __init__(self, path: Path, threads: int):
        import ctranslate2

        from gpt2np import Tokenizer

        self.generator = ctranslate2.Generator(str(path), device="cpu", intra_threads=threads, compute_type="float32")
        tokenizer = Tokenizer()
        self.strings = {i: s for s, i in tokenizer.encoder.items()}  # id -> the vocabulary's token string

    def _tokens(self, ids):
        return [self.strings[i] for i in ids]

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        results = self.generator.generate_batch(
            [self._tokens(p) for p in prompts],
            max_length=new_tokens,
            min_length=new_tokens,
            sampling_topk=1,
            include_prompt_in_result=False,
            end_token=[],
        )
        return [r.sequences_ids[0] for r in results]

    def prefill(self, ids: list[int]) -> np.ndarray:
        logits = self.generator.forward_batch([self._tokens(ids)])
        return np.asarray(logits)[0]
