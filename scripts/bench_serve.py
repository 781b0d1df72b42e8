"""Throughput of `gpt2np serve`: N clients at once against the same N requests sent one by one.

    python scripts/bench_serve.py                  # random weights in GPT-2 small's shape (124M)
    python scripts/bench_serve.py --model gpt2     # a real checkpoint (folder or hub id)
    python scripts/bench_serve.py --api openai     # the same requests through POST /v1/completions

Each request is one prompt, greedy, exactly --max-new-tokens new tokens (ignore_eos on /score; on
/v1/completions, which has no such field, a logit_bias of -100 on <|endoftext|>). The server
runs as a subprocess on a free loopback port; one warm-up request goes first. The ratio is
(time of the N requests one by one) / (time of the N requests sent together). The greedy answers
of both runs are compared: batching may only change float32 rounding.

On a shared machine the wall-clock ratio depends on what else runs; the CPU seconds the server
spent in each phase (read from /proc on Linux) are printed too, as a steadier second figure.
With several BLAS threads and busy cores, threads wait for each other: OPENBLAS_NUM_THREADS=1
(passed on to the server) gives steadier numbers there.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land",
    "My name is John and I am",
    "The capital of France is",
    "In the beginning God created",
    "To be, or not to be,",
    "It was the best of times,",
    "Call me Ishmael. Some years",
    "The meaning of life is",
    "Water boils at",
    "A long time ago in a galaxy",
    "The stock market today",
]


def random_checkpoint(folder: Path) -> Path:
    from gpt2np import GPT2Config
    from gpt2np.checkpoint import random_state_dict, save_checkpoint

    config = GPT2Config.preset("gpt2")
    save_checkpoint(folder, config, random_state_dict(config, seed=0))
    return folder


def start_server(model: str, log_path: Path, max_batch_size: int) -> tuple[subprocess.Popen, int]:
    command = [
        sys.executable,
        "-m",
        "gpt2np.server",
        "--model",
        model,
        "--port",
        "0",
        "--max-batch-size",
        str(max_batch_size),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"on http://127\.0\.0\.1:(\d+) ", log_path.read_text())
        if found:
            return proc, int(found.group(1))
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start; its log:\n{log_path.read_text()}")


def score(port: int, prompt: str, max_new_tokens: int) -> str:
    body = {
        "input_data": [prompt],
        "params": {"do_sample": False, "max_new_tokens": max_new_tokens, "ignore_eos": True, "return_full_text": False},
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/score", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    if response.status != 200:
        raise SystemExit(f"the server answered {response.status}: {answer}")
    return answer[0]


def complete(port: int, prompt: str, max_new_tokens: int, model: str) -> str:
    """The same request as `score`, through OpenAI's completions API."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_new_tokens,
        "temperature": 0,
        "logit_bias": {"50256": -100},
    }  # never <|endoftext|>: every request makes max_new_tokens tokens
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    if response.status != 200:
        raise SystemExit(f"the server answered {response.status}: {answer}")
    return answer["choices"][0]["text"]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux only; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def measured(proc, run, *args) -> tuple[float, float | None, list[str]]:
    """(wall seconds, server CPU seconds, texts) of one phase."""
    cpu_before = cpu_seconds(proc.pid)
    seconds, texts = run(*args)
    cpu_after = cpu_seconds(proc.pid)
    return seconds, None if cpu_before is None or cpu_after is None else cpu_after - cpu_before, texts


def _sender(api: str, port: int, model: str):
    """send(prompt, max_new_tokens) -> text, through the chosen API (as the model, the name the server
    serves it under: a local folder's last component)."""
    if api == "openai":
        from gpt2np.server import public_name

        return lambda prompt, n: complete(port, prompt, n, public_name(model))
    return lambda prompt, n: score(port, prompt, n)


def one_by_one(send, prompts, max_new_tokens) -> tuple[float, list[str]]:
    start = time.perf_counter()
    texts = [send(p, max_new_tokens) for p in prompts]
    return time.perf_counter() - start, texts


def all_at_once(send, prompts, max_new_tokens) -> tuple[float, list[str]]:
    texts: list[str | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def client(i):
        barrier.wait()
        texts[i] = send(prompts[i], max_new_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or hub id (default: random weights in the 124M shape)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--api",
        choices=("score", "openai"),
        default="score",
        help="POST /score (the model card's) or POST /v1/completions (OpenAI's) (default: score)",
    )
    args = parser.parse_args()
    if not 1 <= args.clients <= len(PROMPTS):
        parser.error(f"--clients must be in 1..{len(PROMPTS)}")
    prompts = PROMPTS[: args.clients]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(random_checkpoint(Path(tmp) / "gpt2-random"))
        proc, port = start_server(model, Path(tmp) / "server.log", max_batch_size=args.clients)
        send = _sender(args.api, port, model)
        try:
            send("Warm up", args.max_new_tokens)
            sequential, cpu_alone, texts_alone = measured(proc, one_by_one, send, prompts, args.max_new_tokens)
            concurrent, cpu_together, texts_together = measured(proc, all_at_once, send, prompts, args.max_new_tokens)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    tokens = args.clients * args.max_new_tokens
    print(
        f"model: {args.model or 'random weights, GPT-2 small shape (124M)'}; API: {args.api}; "
        f"{args.clients} requests of "
        f"{args.max_new_tokens} greedy tokens; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    )
    for name, seconds, cpu in (("one by one: ", sequential, cpu_alone), ("all at once:", concurrent, cpu_together)):
        cpu_text = "" if cpu is None else f"  server CPU {cpu:6.2f} s"
        print(f"{name} {seconds:6.2f} s  {tokens / seconds:6.1f} tokens/s{cpu_text}")
    cpu_ratio = f" (server CPU seconds: {cpu_alone / cpu_together:.2f}x)" if cpu_alone and cpu_together else ""
    print(f"throughput ratio: {sequential / concurrent:.2f}x{cpu_ratio}")
    same = sum(a == b for a, b in zip(texts_alone, texts_together))
    print(f"greedy answers identical alone and batched: {same} of {len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
