"""gpt2np benchmarks: tokenizer throughput and model speed / memory, next to the references.

Prints one table: each figure for gpt2np, for the reference (tiktoken, or transformers on PyTorch)
when installed, their ratio, and the floor where one exists. Every figure is the median of
`--repeat` runs made in this process, gpt2np's and the reference's taken in turn, so the ratios
compare runs made seconds apart on the same (noisy) machine.

    python scripts/bench.py                      # tokenizer + random full-size gpt2 (124M)
    python scripts/bench.py --shape gpt2-medium  # the 24-layer, 1024-wide shape
    python scripts/bench.py --model path/to/ckpt # a real checkpoint folder
    python scripts/bench.py --only tokenizer     # one part: tokenizer | model | scaling | tiny

The floor: decoding one token at batch 1 must multiply a vector by every weight matrix once, so
the time of exactly those vector-matrix products over the same weights, in float32 with NumPy's
BLAS, is a floor no float32 implementation can go below on this machine. Beside the prefill, the
table gives the time of its dense products alone (every weight matrix applied to every position):
the part of a prefill that is large matrix products, the same work in any implementation.

Threads: gpt2np's own pool (gpt2np.threads) is measured in-process against the same model with
threads=1. The scaling rows run fresh processes pinned with `taskset -c 0` (one core: gpt2np
threads=1, torch.set_num_threads(1), OpenBLAS sees one CPU) and then on every core, and report
the speedup from one core to all, gpt2np's next to PyTorch's, for the prefill and batch-8 decode.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gpt2np import GPT2, GPT2Config, Tokenizer
from gpt2np.checkpoint import random_state_dict, save_checkpoint
from gpt2np.engine import Engine, Row
from gpt2np.sampling import GenerationOptions

ROWS: list[tuple[str, ...]] = []  # (what, gpt2np, reference, ratio, floor, then a column per peer)
PEER_NAMES: list[str] = []  # the peers of this run (--against), in column order


def ratio_of(ours, ref, higher_is_better=True) -> str:
    if ours is None or ref is None or ref <= 0 or ours <= 0:
        return "-"
    return f"{(ours / ref) if higher_is_better else (ref / ours):.2f}x"


def row(what, ours, ref=None, *, unit="", fmt="{:.1f}", higher_is_better=True, floor=None, peers=None):
    """A table row; `peers` maps a peer's name to its figure, shown with gpt2np's ratio to it."""
    show = lambda v: "-" if v is None else (fmt.format(v) + unit)  # noqa: E731
    peers = peers or {}
    extra = []
    for name in PEER_NAMES:
        value = peers.get(name)
        extra.append("-" if value is None else f"{show(value)} ({ratio_of(ours, value, higher_is_better)})")
    ROWS.append((what, show(ours), show(ref), ratio_of(ours, ref, higher_is_better), floor or "-", *extra))


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ tokenizer
def real_text(min_bytes=400_000) -> str:
    """Real English prose: the Python reference manual's topics that CPython ships (~460 KB)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text.encode()) >= min_bytes
    return text


def cold_encode_time(make, text, repeat):
    """Encode time with a fresh tokenizer each run (empty caches); building it is not timed."""
    times = []
    for _ in range(repeat):
        tok = make()
        t = time.perf_counter()
        tok.encode(text, disallowed_special=())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_tokenizer(repeat):
    text = real_text()
    mb = len(text.encode()) / 1e6
    load = median_time(Tokenizer, repeat)
    cold = cold_encode_time(Tokenizer, text, repeat)
    tok = Tokenizer()
    tok.encode(text, disallowed_special=())
    warm = median_time(lambda: tok.encode(text, disallowed_special=()), repeat)
    ref_cold = ref_warm = None
    try:
        import tiktoken

        from gpt2np.tokenizer import GPT2_PATTERN

        ranks = tok.mergeable_ranks()

        def make():
            return tiktoken.Encoding(
                name=f"gpt2-bench-{time.perf_counter_ns()}",
                pat_str=GPT2_PATTERN,
                mergeable_ranks=ranks,
                special_tokens={"<|endoftext|>": 50256},
            )

        ref_cold = cold_encode_time(make, text, repeat)
        enc = make()
        enc.encode(text, disallowed_special=())
        ref_warm = median_time(lambda: enc.encode(text, disallowed_special=()), repeat)
        ref_cold = mb / ref_cold
        ref_warm = mb / ref_warm
    except ImportError:
        pass
    row(
        f"tokenizer: cold encode, {mb * 1000:.0f} KB prose, fresh Tokenizer()",
        mb / cold,
        ref_cold,
        unit=" MB/s",
        floor="target >= 2 MB/s",
    )
    row("tokenizer: warm encode (same text again)", mb / warm, ref_warm, unit=" MB/s")
    row(
        "tokenizer: vocabulary load",
        load,
        None,
        unit=" s",
        fmt="{:.3f}",
        higher_is_better=False,
        floor="target < 0.3 s",
    )


# ------------------------------------------------------------------------------------ model
def make_checkpoint(shape: str, folder: Path) -> Path:
    config = GPT2Config.preset(shape)
    save_checkpoint(folder, config, random_state_dict(config, seed=0))
    return folder


def block_matrices(model):
    """Every weight matrix of the transformer blocks, in the order a forward pass uses them."""
    return [
        p[module][name]["weight"]
        for p in model.params["h"]
        for module, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
    ]


def floor_step(model):
    """One decoding step's bare vector-matrix products over the model's weights (the floor)."""
    mats, wte = block_matrices(model), model.lm_head_weight
    vectors = {w.shape[0]: np.ones((1, w.shape[0]), np.float32) for w in mats}
    v = np.ones((1, wte.shape[1]), np.float32)

    def step():
        for w in mats:
            vectors[w.shape[0]] @ w
        v @ wte.T

    return step


def dense_products(model, T):
    """A T-token prefill's bare matrix products over the model's weights: every block matrix and
    the LM head, applied to T rows. Not a floor for the whole prefill (attention, softmax, GELU and
    layer norm come on top), but the share of it that any float32 implementation spends in large
    matrix products, which BLAS already runs near the machine's peak."""
    mats, wte = block_matrices(model), model.lm_head_weight
    rows = {w.shape[0]: np.ones((T, w.shape[0]), np.float32) for w in mats}
    x = np.ones((T, wte.shape[1]), np.float32)

    def run():
        for w in mats:
            rows[w.shape[0]] @ w
        x @ wte.T

    return run


def interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds of each function, the runs taken in turn (a, b, a, b, ...) so that a slow
    spell of the machine hits every contender alike and the ratios stay meaningful."""
    times = {name: [] for name, fn in fns.items() if fn is not None}
    for _ in range(repeat):
        for name in times:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_prompts(batch, prompt_len):
    return [[(13 * b + i) % 50000 + 1 for i in range(prompt_len)] for b in range(batch)]


def ours_decode(model, batch, prompt_len, new_tokens):
    out = model.generate_ids(
        bench_prompts(batch, prompt_len), max_new_tokens=new_tokens, do_sample=False, ignore_eos=True
    )
    assert all(len(o) == new_tokens for o in out)
    return out


def make_peers(folder: Path, model, new_tokens: int) -> dict:
    """The --against peers on this checkpoint, each with gpt2np's thread count, checked first: their
    greedy ids for the bench's prompts (batch 1 and 8) must equal gpt2np's."""
    if not PEER_NAMES:
        return {}
    import bench_peers

    work = Path(tempfile.mkdtemp(prefix="gpt2np-peers-"))
    peers = {}
    for name in PEER_NAMES:
        if name == "onnxruntime":
            peer = bench_peers.OnnxDecoder(
                bench_peers.export_onnx(folder, work / "decoder.onnx"), model.config, model.threads.n
            )
        else:
            peer = bench_peers.CT2Decoder(bench_peers.convert_ct2(folder, work / "ct2"), model.threads.n)
        for batch in (1, 8):
            ours = ours_decode(model, batch, 8, new_tokens)
            theirs = peer.generate(bench_prompts(batch, 8), new_tokens)
            if theirs != ours:
                raise SystemExit(f"bench.py: {name}'s greedy ids differ from gpt2np's at batch {batch}: not timed")
        peers[name] = peer
    return peers


def ours_step_rate(model, position, steps=32):
    """Tokens/s of decoding steps after a prompt of `position` tokens (prefill excluded)."""
    prompt = [(7 * i) % 50000 + 1 for i in range(position)]
    options = GenerationOptions(do_sample=False, max_new_tokens=steps + 1, ignore_eos=True)
    engine = Engine(model)
    engine.add([Row(prompt, options, None, model.config.vocab_size)])  # prefill
    engine.choose()  # the first token
    t = time.perf_counter()
    n = 0
    while engine.rows:
        engine.forward()
        n += len(engine.choose())
    return n / (time.perf_counter() - t)


def hf_model(folder):
    try:
        import torch
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging
    except ImportError:
        return None, None
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return torch, GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()


def hf_decode(torch, model, batch, prompt_len, new_tokens):
    ids = torch.tensor([[(13 * b + i) % 50000 + 1 for i in range(prompt_len)] for b in range(batch)])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == prompt_len + new_tokens


def hf_prefill(torch, model, T):
    ids = torch.tensor([[(7 * i) % 50000 + 1 for i in range(T)]])
    with torch.inference_mode():
        model(ids, use_cache=False)


SCALING_CHILD = """
import os, statistics, sys, time
which, folder, task, repeat, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cores = len(os.sched_getaffinity(0))
if which == "gpt2np":
    from gpt2np import GPT2
    m = GPT2.from_pretrained(folder, threads=cores)
    T = m.config.n_ctx
    prompts = [[(13 * b + i) % 50000 + 1 for i in range(8)] for b in range(8)]
    prefill = lambda: m(list(range(1, T + 1)))
    decode = lambda: m.generate_ids(prompts, max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
else:
    import torch
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(cores)
    m = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    T = m.config.n_positions
    ids = torch.tensor([list(range(1, T + 1))])
    p = torch.tensor([[(13 * b + i) % 50000 + 1 for i in range(8)] for b in range(8)])
    def prefill():
        with torch.inference_mode():
            m(ids, use_cache=False)
    def decode():
        with torch.inference_mode():
            m.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
fn = prefill if task == "prefill" else decode
fn()
times = []
for _ in range(repeat):
    t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
print(statistics.median(times))
"""


SPLIT_CHILD = """
import collections, json, os, statistics, sys, time
import numpy as np
import gpt2np.runner as R
from gpt2np import GPT2
folder, repeat = sys.argv[1], int(sys.argv[2])
m = GPT2.from_pretrained(folder, threads=len(os.sched_getaffinity(0)))
ids = np.arange(m.config.n_ctx) % 50000 + 1
spent = collections.Counter()
def timed(module, name, kind):
    f = getattr(module, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); spent[kind] += time.perf_counter() - t; return r
    setattr(module, name, g)
timed(R, "linear", "products"); timed(R, "causal_attention", "attention"); timed(R, "layer_norm", "layer norms")
timed(R, "lm_head", "LM head")
runs = collections.defaultdict(list)
m(ids)
for _ in range(repeat):
    spent.clear(); t = time.perf_counter(); m(ids); total = time.perf_counter() - t
    for kind, v in spent.items(): runs[kind].append(v)
    runs["the rest"].append(total - sum(spent.values()))
print(json.dumps({kind: statistics.median(v) for kind, v in runs.items()}))
"""


def time_split(folder, cores, repeat):
    """Seconds of a full-context prefill by kind of work: products (with bias and GELU), attention,
    layer norms, LM head, the rest; in a fresh process pinned to the first `cores` cores (None: all)."""
    import json

    pin = [] if cores is None else ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])]
    out = subprocess.run(
        [*pin, sys.executable, "-c", SPLIT_CHILD, str(folder), str(repeat)], capture_output=True, text=True
    )
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict(one: dict, every: dict, cores: int, n: int) -> float:
    """A prediction, not a measurement: each kind of work scaled to n cores by Amdahl's law, with the
    parallel fraction f that its measured speedup s from 1 to `cores` cores implies
    (s = 1 / (1 - f + f / cores)); f is clipped to [0, 1]."""
    total = 0.0
    for kind, t1 in one.items():
        s = t1 / every[kind]
        f = min(1.0, max(0.0, (1 - 1 / s) / (1 - 1 / cores)))
        total += t1 * (1 - f + f / n)
    return total


def scaling_time(which, folder, task, cores, repeat, new_tokens):
    """Median seconds of `task` in a fresh process pinned to the first `cores` cores (None: all)."""
    pin = [] if cores is None else ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])]
    command = [*pin, sys.executable, "-c", SCALING_CHILD, which, str(folder), task, str(repeat), str(new_tokens)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    return float(out.stdout.strip().splitlines()[-1])


def bench_scaling(folder: Path, label: str, repeat: int, new_tokens: int):
    """The speedup from one core to all of them, gpt2np's and PyTorch's, each in fresh processes."""
    import shutil

    if shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        print("scaling: skipped (needs taskset and sched_getaffinity)", file=sys.stderr)
        return
    cores = len(os.sched_getaffinity(0))
    has_hf = hf_model(folder)[0] is not None
    measured = {}
    for task, what in (("prefill", "prefill, full context"), ("decode", f"greedy decode, batch 8, {new_tokens} new")):
        times = {}
        for which in ("gpt2np", "transformers") if has_hf else ("gpt2np",):
            times[which] = (
                scaling_time(which, folder, task, 1, repeat, new_tokens),
                scaling_time(which, folder, task, None, repeat, new_tokens),
            )
        measured[task] = times
        speedup = {w: (o / e if o and e else None) for w, (o, e) in times.items()}
        detail = "; ".join(f"{w}: {o:.2f} s -> {e:.2f} s" for w, (o, e) in times.items() if o and e)
        row(
            f"{label}: {what}, speedup 1 -> {cores} cores",
            speedup["gpt2np"],
            speedup.get("transformers"),
            unit="x",
            fmt="{:.2f}",
            floor=f"{detail} (target: gpt2np's speedup >= PyTorch's)",
        )

    one, every = time_split(folder, 1, repeat), time_split(folder, None, repeat)
    if not (one and every):
        return
    for kind in one:
        row(
            f"{label}: prefill time split, {kind}, 1 -> {cores} cores",
            one[kind],
            None,
            unit=" s",
            fmt="{:.2f}",
            higher_is_better=False,
            floor=f"{every[kind]:.2f} s on {cores} cores: {one[kind] / every[kind]:.2f}x",
        )
    # PyTorch's prefill as one kind of work, its fraction from its own measured 1 -> `cores` speedup.
    hf_one, hf_every = measured["prefill"].get("transformers", (None, None))
    for n in (4, 8, 16):
        ours = predict(one, every, cores, n)
        theirs = predict({"all": hf_one}, {"all": hf_every}, cores, n) if hf_one and hf_every else None
        ratio = (
            f"; predicted prefill {ours:.2f} s, transformers {theirs:.2f} s: gpt2np at {theirs / ours:.2f}x its speed"
            if theirs
            else ""
        )
        row(
            f"{label}: prefill at {n} cores, PREDICTED speedup over 1 core",
            sum(one.values()) / ours,
            hf_one / theirs if theirs else None,
            unit="x",
            fmt="{:.2f}",
            floor=f"a prediction (Amdahl per kind of work, fractions from the split above){ratio}",
        )


PEAK_RSS_CHILD = """
import sys
which, folder = sys.argv[1], sys.argv[2]
if which == "gpt2np":
    from gpt2np import GPT2
    m = GPT2.from_pretrained(folder)
    m.generate_ids([[1, 2, 3, 4, 5, 6, 7, 8]], max_new_tokens=128, do_sample=False, ignore_eos=True)
else:
    import torch
    from transformers import GPT2LMHeadModel
    m = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        m.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across fork + exec.
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024)
"""


def peak_rss_mib(which, folder):
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, which, str(folder)], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def bench_model(folder: Path, label: str, repeat: int, new_tokens: int):
    load = median_time(lambda: GPT2.from_pretrained(folder), repeat)
    model = GPT2.from_pretrained(folder)
    torch, hf = hf_model(folder)
    hf_load = median_time(lambda: hf_model(folder), repeat) if hf is not None else None
    c = model.config
    title = f"{label} ({c.n_layer} layers, {c.n_embd} wide)"
    step = floor_step(model)

    def floor_run():  # the floor of the same number of decoding steps
        for _ in range(new_tokens):
            step()

    serial = GPT2(c, model.params, model.tokenizer, threads=1)
    peers = make_peers(folder, model, new_tokens)
    ours_decode(model, 1, 8, 4)  # warm up
    if hf is not None:
        hf_decode(torch, hf, 1, 8, 4)
    t = interleaved(
        {
            "ours": lambda: ours_decode(model, 1, 8, new_tokens),
            "floor": floor_run,
            "hf": hf and (lambda: hf_decode(torch, hf, 1, 8, new_tokens)),
        }
        | {name: (lambda p=p: p.generate(bench_prompts(1, 8), new_tokens)) for name, p in peers.items()},
        repeat,
    )
    per_token, floor = t["ours"] / new_tokens, t["floor"] / new_tokens
    row(
        f"{title}: greedy decode, batch 1, 8-token prompt, {new_tokens} new",
        1 / per_token,
        hf and new_tokens / t["hf"],
        unit=" tok/s",
        floor=f"{1 / floor:.1f} tok/s ({floor * 1e3:.1f} ms/token); gpt2np at {floor / per_token:.0%}",
        peers={name: new_tokens / t[name] for name in peers},
    )

    T = c.n_ctx
    model(np.arange(16))
    t = interleaved(
        {
            "ours": lambda: model(np.arange(T) % 50000 + 1),
            "serial": lambda: serial(np.arange(T) % 50000 + 1),
            "dense": dense_products(model, T),
            "hf": hf and (lambda: hf_prefill(torch, hf, T)),
        }
        | {name: (lambda p=p: p.prefill(list(np.arange(T) % 50000 + 1))) for name, p in peers.items()},
        repeat,
    )
    dense = f"dense products alone: {t['dense']:.2f} s; gpt2np {t['ours']:.2f} s"
    if hf is not None:
        dense += f", transformers {t['hf']:.2f} s"
    row(
        f"{title}: prefill, {T} tokens (logits for every position)",
        T / t["ours"],
        hf and T / t["hf"],
        unit=" tok/s",
        floor=dense,
        peers={name: T / t[name] for name in peers},
    )
    row(
        f"{title}: prefill, {T} tokens, threads={model.threads.n} against threads=1",
        t["serial"] / t["ours"],
        None,
        unit="x",
        fmt="{:.2f}",
        floor=f"threads=1 {t['serial']:.2f} s, threads={model.threads.n} {t['ours']:.2f} s",
    )

    t = interleaved(
        {
            "ours": lambda: ours_decode(model, 8, 8, new_tokens),
            "hf": hf and (lambda: hf_decode(torch, hf, 8, 8, new_tokens)),
        }
        | {name: (lambda p=p: p.generate(bench_prompts(8, 8), new_tokens)) for name, p in peers.items()},
        repeat,
    )
    row(
        f"{title}: greedy decode, batch 8, {new_tokens} new each (total)",
        8 * new_tokens / t["ours"],
        hf and 8 * new_tokens / t["hf"],
        unit=" tok/s",
        peers={name: 8 * new_tokens / t[name] for name in peers},
    )

    rates = {"early": [], "late": []}
    for _ in range(repeat):
        rates["early"].append(ours_step_rate(model, 10))
        rates["late"].append(ours_step_rate(model, min(900, c.n_ctx - 40)))
    early, late = statistics.median(rates["early"]), statistics.median(rates["late"])
    row(
        f"{title}: decode step rate at position 10 / 900",
        early,
        None,
        unit=" tok/s",
        floor=f"at 900: {late:.1f} tok/s = {late / early:.0%} of position 10 (target >= 75%)",
    )

    row(
        f"{title}: load (from_pretrained, file in page cache)",
        load,
        hf_load,
        unit=" s",
        fmt="{:.2f}",
        higher_is_better=False,
        floor="target < 1 s",
    )
    rss = peak_rss_mib("gpt2np", folder)
    hf_rss = peak_rss_mib("transformers", folder) if hf is not None else None
    weights_mib = sum(a.nbytes for a in _arrays(model.params)) / 2**20
    row(
        f"{title}: peak RSS, load + {128} tokens",
        rss,
        hf_rss,
        unit=" MiB",
        fmt="{:.0f}",
        higher_is_better=False,
        floor=f"weights: {weights_mib:.0f} MiB; target < 800 MiB for 124M",
    )


def _arrays(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _arrays(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _arrays(v)
    else:
        yield tree


# ------------------------------------------------------------------------------------ report
def machine() -> str:
    blas = "unknown"
    try:
        from threadpoolctl import threadpool_info

        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if info:
            i = info[0]
            blas = (
                f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, {i.get('num_threads')} threads)"
            )
    except ImportError:
        pass
    versions = [f"numpy {np.__version__}"]
    for name in ("torch", "transformers", "tiktoken"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, BLAS: {blas}; "
        + ", ".join(versions)
    )


def bench_tiny(repeat: int, new_tokens: int):
    """The small trained model that ships in the package (`tiny`): greedy decoding at batch 1 and 8,
    against transformers on the same folder. Its 50,257 x 192 LM head is most of a step."""
    from gpt2np.locate import BUNDLED

    folder = BUNDLED["tiny"]
    model = GPT2.from_pretrained("tiny")
    torch, hf = hf_model(folder)
    c = model.config
    new_tokens = min(new_tokens, c.n_ctx - 8)
    for batch in (1, 8):
        ours_decode(model, batch, 8, 4)  # warm up
        if hf is not None:
            hf_decode(torch, hf, batch, 8, 4)
        t = interleaved(
            {
                "ours": lambda: ours_decode(model, batch, 8, new_tokens),
                "hf": hf and (lambda: hf_decode(torch, hf, batch, 8, new_tokens)),
            },
            repeat,
        )
        row(
            f"tiny ({c.n_layer} layers, {c.n_embd} wide, trained): greedy decode, batch {batch}, {new_tokens} new"
            + (" each (total)" if batch > 1 else ""),
            batch * new_tokens / t["ours"],
            hf and batch * new_tokens / t["hf"],
            unit=" tok/s",
        )


def print_table(repeat):
    header = ("what", "gpt2np", "reference", "ratio", "floor / target", *(f"{n} (gpt2np / it)" for n in PEER_NAMES))
    rows = [r + ("-",) * (len(header) - len(r)) for r in ROWS]  # rows made before the peers' columns
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(f"machine: {machine()}")
    print(f"median of {repeat} runs; reference = tiktoken for the tokenizer, transformers (PyTorch) for the model")
    if PEER_NAMES:
        print(
            f"peers (float32, the same checkpoint, the same threads, greedy ids checked equal): {', '.join(PEER_NAMES)}"
        )
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint folder (default: a random checkpoint of --shape)")
    parser.add_argument("--shape", default="gpt2", help="preset shape for the random checkpoint (default: gpt2)")
    parser.add_argument("--only", choices=["tokenizer", "model", "scaling", "tiny"], help="run one part only")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is reported (default: 3)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per decode run (default: 128)")
    parser.add_argument(
        "--against",
        default="",
        help="peers run in the same process on the same checkpoint: a comma-separated list of "
        "onnxruntime, ctranslate2 (the bench extra; scripts/bench_peers.py)",
    )
    args = parser.parse_args(argv)
    for name in filter(None, args.against.split(",")):
        from bench_peers import PEERS, missing

        if name not in PEERS:
            parser.error(f"--against {name}: the peers are {', '.join(PEERS)}")
        if (why := missing(name)) is not None:
            parser.error(f"--against {name}: {why}")
        PEER_NAMES.append(name)
    if args.only in (None, "tokenizer"):
        bench_tokenizer(args.repeat)
    if args.only in (None, "tiny"):
        bench_tiny(args.repeat, args.new_tokens)
    if args.only not in ("tokenizer", "tiny"):
        with tempfile.TemporaryDirectory() as tmp:
            if args.model:
                folder, label = Path(args.model), Path(args.model).name
            else:
                folder, label = (
                    make_checkpoint(args.shape, Path(tmp) / args.shape),
                    f"{args.shape} shape, random weights",
                )
            if args.only in (None, "model"):
                bench_model(folder, label, args.repeat, args.new_tokens)
            if args.only in (None, "scaling"):
                bench_scaling(folder, label, args.repeat, args.new_tokens)
    print_table(args.repeat)


if __name__ == "__main__":
    main()
