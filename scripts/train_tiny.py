#!/usr/bin/env python3
"""Train the small GPT-2 that ships in gpt2np/models/tiny, on the Python standard library's source.

    pip install -e ".[train]"                    # PyTorch 2.13.0 (CPU) and transformers
    python scripts/train_tiny.py --out gpt2np/models/tiny

A training script in the manner of nanoGPT's train.py: the settings and their defaults first, then
the data (the running interpreter's own standard library, tokenized once into one array of ids), the
model (transformers' GPT2LMHeadModel, so the result is a GPT-2 checkpoint like any other), a plain
loop (warmup, cosine decay, gradient clipping, a held-out evaluation every `eval_every` steps) and
the save: config.json, model.safetensors in float16, GPT-2's tokenizer files and a model card.

Data. Every `*.py` file under the standard library's folder (`sysconfig`'s "stdlib" path), sorted by
its path, except: site-packages (not the standard library), test suites (`test/`, and folders named
`test`, `tests` or `idle_test`), generated tables and text (`encodings/`, `pydoc_data/`), build
files (`_sysconfigdata*`, `config-*`), and the held-out packages (`HELD_OUT`), which training never
sees. Documents are separated by <|endoftext|>, as GPT-2's were.

One thing differs from a textbook loop, and changes no number of the result. The standard library
uses about 18,000 of GPT-2's 50,257 tokens; the others never occur, so training keeps one shared
embedding row for all of them (`unseen`) and computes the softmax over the tokens seen plus that one
row, with log(number unseen) added to its logit. That is the full softmax of a model whose unseen
rows all equal the shared one, exactly, and that is the model saved: the head costs a third as much,
and the shipped checkpoint is a plain 50,257-token GPT-2.

Determinism: the same seed, thread count, settings and standard library give the same weights
(tests/test_tiny.py runs a few steps twice and compares the saved tensors bit for bit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HELD_OUT = ("json", "email")  # packages left out of training entirely, for held-out perplexity
SKIP_TOP = {"site-packages", "test", "encodings", "pydoc_data", "lib-dynload", "__phello__"}
SKIP_ANYWHERE = {"test", "tests", "idle_test"}


@dataclass
class Settings:
    out: str = "gpt2np/models/tiny"
    seed: int = 0
    threads: int = 2  # torch threads: the same count gives the same weights
    n_layer: int = 6  # chosen by 200-step trials (held-out json perplexity, wall time): 6 x 192 gave
    n_head: int = 6  # 41.5 in 5.4 min; 4 x 256 44.4 in 6.5; 4 x 192 46.2 in 4.4; 8 x 192 53.0 in 5.7
    n_embd: int = 192
    n_ctx: int = 256
    batch_size: int = 16  # sequences of n_ctx tokens per step
    steps: int = 1200  # about 30 minutes on 2 cores
    lr: float = 3e-3
    min_lr: float = 3e-4  # the cosine decays to this
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200  # steps between held-out evaluations (on `eval_tokens` tokens of json)
    eval_tokens: int = 8192
    eval_stride: int = 128  # the sliding window's step for the held-out perplexity (window: n_ctx)
    compile: bool = True  # torch.compile: about 1.3x faster here, after about 45 s of compiling
    held_out: bool = True  # the final perplexity of every held-out package (about 1 minute)
    progress: bool = True


# ------------------------------------------------------------------------------------------ data
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> dict[str, list[Path]]:
    """The standard library's *.py files, sorted by path: {"train": [...], package: [...] for HELD_OUT}."""
    root = stdlib_root() if root is None else root
    split: dict[str, list[Path]] = {"train": [], **{p: [] for p in HELD_OUT}}
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts = path.relative_to(root).parts
        top = parts[0]
        if top in SKIP_TOP or top.startswith(("config-", "_sysconfigdata")) or SKIP_ANYWHERE & set(parts[:-1]):
            continue
        split[top if top in HELD_OUT else "train"].append(path)
    return split


def held_out_text(package: str, root: Path | None = None) -> str:
    """A held-out package as one text: its files in path order, joined by a newline. This text is
    what the model card's held-out perplexity scores (`gpt2np eval --task text --data FILE`)."""
    return "\n".join(p.read_text(encoding="utf-8") for p in stdlib_files(root)[package])


def training_ids(tokenizer, files: list[Path]) -> np.ndarray:
    """Every training file's ids, each document followed by <|endoftext|>, as one uint16 array."""
    ids: list[int] = []
    for path in files:
        ids += tokenizer.encode(path.read_text(encoding="utf-8"), disallowed_special=())
        ids.append(tokenizer.eot_token)
    return np.array(ids, dtype=np.uint16)


def batches(ids: np.ndarray, s: Settings):
    """Random windows of n_ctx + 1 tokens (inputs and their next tokens), drawn from the seed."""
    import torch

    rng = np.random.default_rng(s.seed)
    while True:
        starts = rng.integers(0, len(ids) - s.n_ctx - 1, size=s.batch_size)
        window = np.stack([ids[i : i + s.n_ctx + 1] for i in starts]).astype(np.int64)
        yield torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])


# ------------------------------------------------------------------------------------------ model
def gpt2_config(s: Settings, vocab_size: int, eot: int | None = 50256):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=s.n_ctx,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=s.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=True,
    )


class Compact:
    """The ids of the tokens seen in training, and the map from GPT-2's ids to the training model's:
    seen token i is row i, every unseen token the last row, `unseen`."""

    def __init__(self, ids: np.ndarray, vocab_size: int = 50257):
        self.seen = np.unique(ids)  # sorted GPT-2 ids
        self.unseen = len(self.seen)
        self.n_unseen = vocab_size - len(self.seen)
        import torch

        self.index = torch.full((vocab_size,), self.unseen, dtype=torch.int64)
        self.index[torch.from_numpy(self.seen.astype(np.int64))] = torch.arange(len(self.seen))
        self.offset = torch.zeros(self.unseen + 1)  # added to the logits:
        self.offset[-1] = math.log(self.n_unseen)  # the shared row stands for n_unseen equal logits

    def __call__(self, x):  # GPT-2 ids -> rows of the training model
        return self.index[x]


def loss_fn(model, compact: Compact, x, y):
    """Cross-entropy of the next token, the softmax over the seen tokens and the shared unseen row."""
    import torch.nn.functional as F

    h = model.transformer(input_ids=compact(x)).last_hidden_state  # [B, T, C]
    logits = F.linear(h, model.transformer.wte.weight, compact.offset)  # [B, T, seen + 1]
    return F.cross_entropy(logits.flatten(0, 1), compact(y).flatten())


def full_model(model, compact: Compact, s: Settings):
    """The 50,257-token GPT-2 the training model stands for, weights rounded to float16 (as saved)."""
    import torch
    from transformers import GPT2LMHeadModel

    state = {k.removeprefix("_orig_mod."): v.detach().clone() for k, v in model.state_dict().items()}
    wte = state["transformer.wte.weight"]
    full = wte[compact.unseen].repeat(len(compact.index), 1)  # every row the shared unseen one
    full[torch.from_numpy(compact.seen.astype(np.int64))] = wte[: compact.unseen]
    state["transformer.wte.weight"] = full
    state["lm_head.weight"] = full
    result = GPT2LMHeadModel(gpt2_config(s, len(compact.index)))
    result.load_state_dict({k: v.half().float() for k, v in state.items()})
    return result.eval()


def held_out_perplexity(full, tokenizer, text: str, s: Settings, limit: int | None = None) -> float:
    """Perplexity of `text` under the full model, by gpt2np's sliding-window rule (gpt2np.evaluate)
    with <|endoftext|> first: the figure `gpt2np eval --task text --prepend-eot` gives for the text."""
    import torch

    from gpt2np.evaluate import sliding_windows

    ids = [tokenizer.eot_token] + tokenizer.encode(text, disallowed_special=())
    ids = torch.tensor(ids[:limit] if limit else ids)
    windows = sliding_windows(len(ids), max_length=s.n_ctx, stride=s.eval_stride)
    nll = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), 16):  # 16 windows a pass; a short last window runs alone
            group = windows[i : i + 16]
            for same in ([w for w in group if w[1] - w[0] == s.n_ctx], [w for w in group if w[1] - w[0] < s.n_ctx]):
                if not same:
                    continue
                x = torch.stack([ids[b:e] for b, e, _ in same])  # [n, T]
                h = full.transformer(input_ids=x).last_hidden_state  # [n, T, C]
                for row, (b, e, first) in enumerate(same):
                    logits = full.lm_head(h[row, first - b - 1 : -1])  # [n, V], only where a token is scored
                    target = logits.gather(1, ids[first:e, None])[:, 0]
                    nll += (logits.logsumexp(-1) - target).double().sum().item()
    return math.exp(nll / (len(ids) - 1))


def learning_rate(step: int, s: Settings) -> float:
    """Linear warmup, then cosine decay from lr to min_lr."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------ train
def train(s: Settings) -> dict:
    import torch
    from tqdm import tqdm

    from gpt2np import Tokenizer

    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    tokenizer = Tokenizer()
    files = stdlib_files()
    ids = training_ids(tokenizer, files["train"])
    compact = Compact(ids)
    model = __import__("transformers").GPT2LMHeadModel(gpt2_config(s, compact.unseen + 1, eot=None))
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings; not biases or norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    step_loss = torch.compile(loss_fn) if s.compile else loss_fn
    json_text = held_out_text("json")
    log, losses, start, data = [], [], time.perf_counter(), batches(ids, s)
    bar = tqdm(range(s.steps), desc="training", unit="step", file=sys.stderr, disable=not s.progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        x, y = next(data)
        loss = step_loss(model, compact, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        entry = {"step": step + 1, "loss": losses[-1], "seconds": round(elapsed, 1)}
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            full = full_model(model, compact, s)
            entry["held_out_ppl_json_head"] = held_out_perplexity(full, tokenizer, json_text, s, s.eval_tokens)
        if step % 10 == 0 or "held_out_ppl_json_head" in entry or step + 1 == s.steps:
            log.append(entry)  # every 10th step, and every evaluation
        bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{(step + 1) * s.batch_size * s.n_ctx / elapsed:.0f}")
    wall = time.perf_counter() - start
    full = full_model(model, compact, s)
    held_out = {p: held_out_perplexity(full, tokenizer, held_out_text(p), s) for p in HELD_OUT} if s.held_out else {}
    return {
        "model": full,
        "compact": compact,
        "train_tokens": int(len(ids)),
        "train_files": len(files["train"]),
        "held_out_files": {p: len(files[p]) for p in HELD_OUT},
        "tokens_seen": s.steps * s.batch_size * s.n_ctx,
        "wall_seconds": wall,
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-20:])),
        "held_out_ppl": held_out,
        "log": log,
    }


# ------------------------------------------------------------------------------------------ save
def save(result: dict, s: Settings) -> Path:
    """The hub layout: config.json, model.safetensors (float16), vocab.json + merges.txt, README.md."""
    import torch
    from safetensors.torch import save_file

    from gpt2np import config as gpt2np_config

    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    full = result["model"]
    state = {k.removeprefix("transformer."): v.half().contiguous() for k, v in full.state_dict().items()}
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to wte, as the hub's gpt2 stores it
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = full.config.to_dict()
    keep = (
        "activation_function architectures bos_token_id eos_token_id layer_norm_epsilon model_type n_ctx n_embd "
        "n_head n_inner n_layer n_positions scale_attn_weights tie_word_embeddings vocab_size"
    ).split()
    config = {k: config[k] for k in keep if k in config} | {"n_ctx": s.n_ctx, "architectures": ["GPT2LMHeadModel"]}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    vocab = Path(gpt2np_config.__file__).parent / "vocab"
    shutil.copyfile(vocab / "encoder.json", out / "vocab.json")
    shutil.copyfile(vocab / "vocab.bpe", out / "merges.txt")
    record = {k: v for k, v in result.items() if k not in ("model", "compact")}
    record |= {
        "settings": asdict(s),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "held_out_sha256": {p: hashlib.sha256(held_out_text(p).encode()).hexdigest() for p in HELD_OUT},
        "tokens_in_training_vocabulary": int(result["compact"].unseen),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "README.md").write_text(model_card(record, s))
    return out


def model_card(r: dict, s: Settings) -> str:
    ppl = ", ".join(f"`{p}` {v:.2f}" for p, v in r["held_out_ppl"].items())
    held = ", ".join(f"`{p}` ({n} files)" for p, n in r["held_out_files"].items())
    data = f"{r['train_files']} files, {r['train_tokens']:,} tokens"
    schedule = f"lr {s.lr} warmup {s.warmup} then cosine to {s.min_lr}"
    return f"""---
license: psf-2.0
language: code
tags: [gpt2, python, tiny]
---
# gpt2np tiny: a {s.n_layer}-layer GPT-2 trained on Python's standard library

A GPT-2 (transformers' `GPT2LMHeadModel`: pre-norm blocks, learned positions, tied LM head,
`gelu_new`) with GPT-2's own 50,257-token vocabulary, trained by `scripts/train_tiny.py` in
gpt2np's repository. It ships inside the gpt2np package so that the library can be tried, and
tested on a real model, with nothing to download: `GPT2.from_pretrained("tiny")`, `--model tiny`.

| | |
| --- | --- |
| shape | {s.n_layer} layers, {s.n_head} heads, width {s.n_embd}, context {s.n_ctx} ({r["parameters"]:,} parameters) |
| data | the `*.py` files of Python {r["python"]}'s standard library: {data} |
| left out | test suites, `encodings/`, `pydoc_data/`, build files, site-packages; held out: {held} |
| training | {s.steps} steps of {s.batch_size} x {s.n_ctx} tokens: {r["tokens_seen"]:,} tokens seen |
| optimiser | AdamW (0.9, 0.95), {schedule}, weight decay {s.weight_decay}, clip {s.grad_clip} |
| wall time | {r["wall_seconds"] / 60:.1f} minutes on {s.threads} CPU threads (torch {r["torch"]}), seed {s.seed} |
| loss | {r["first_loss"]:.3f} at the first step, {r["final_loss"]:.3f} over the last 20 (nats per token) |
| held-out perplexity | {ppl} (windows of {s.n_ctx} moving by {s.eval_stride}, float16 weights) |
| weights | float16 safetensors |

The held-out perplexity of a package is that of its files joined by newlines, in path order, with
<|endoftext|> first; `gpt2np eval --model tiny --task text --data FILE --stride {s.eval_stride}
--prepend-eot` gives the same figure (tests/test_tiny.py checks it within 0.5%).

Training used {r["tokens_in_training_vocabulary"]:,} token rows: every token seen in the data,
and one row shared by the tokens never seen (the saved model gives them all that row).

## Limitations

It writes Python-like text and nothing else: code in the style of the standard library, often
plausible line by line and rarely correct as a program. It knows no English beyond comments and
docstrings, has a 256-token context, and was never checked for anything but perplexity. Use it to
try gpt2np and to test it, not for any task.

## License

The training data is the Python standard library's source, under the PSF License Agreement
(Python Software Foundation License Version 2); these weights are offered under the same terms.
GPT-2's tokenizer files are OpenAI's (MIT).
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(Settings()).items():
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"default: {default}")
    s = Settings(**vars(parser.parse_args(argv)))
    result = train(s)
    result["parameters"] = sum(p.numel() for p in result["model"].parameters())  # the tied head counted once
    out = save(result, s)
    print(json.dumps({k: v for k, v in result.items() if k not in ("model", "compact", "log")}, indent=1))
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
