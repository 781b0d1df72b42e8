"""Throughput of `gpt2np batch`, both tasks, with 1 and 2 worker processes (the figures of docs/scaling.md).

    python scripts/bench_batch.py                  # random weights in GPT-2 small's shape (124M)
    python scripts/bench_batch.py --model gpt2     # a real checkpoint (folder or hub id)

generate: --lines prompts, greedy, exactly --new-tokens each (ignore_eos), --batch-size lines a batch.
score: --lines documents of about --doc-tokens tokens each. Each run is the command as a user runs
it, model loading included; lines/s and tokens/s (new tokens for generate, scored tokens for
score) are over the whole run. The outputs of 1 and 2 workers are compared: they must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there one all we their would been has more when will who if no out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through years where much "
    "your way"
).split()


def random_checkpoint(folder: Path) -> Path:
    from gpt2np import GPT2Config
    from gpt2np.checkpoint import random_state_dict, save_checkpoint

    config = GPT2Config.preset("gpt2")
    save_checkpoint(folder, config, random_state_dict(config, seed=0))
    return folder


def write_inputs(folder: Path, lines: int, doc_tokens: int, new_tokens: int) -> dict[str, Path]:
    rng = random.Random(0)
    params = {"max_new_tokens": new_tokens, "do_sample": False, "ignore_eos": True}
    prompts = [
        {"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))), "params": params}
        for _ in range(lines)
    ]
    docs = [{"text": " ".join(rng.choice(WORDS) for _ in range(doc_tokens))} for _ in range(lines)]
    paths = {"generate": folder / "prompts.jsonl", "score": folder / "docs.jsonl"}
    for task, objects in (("generate", prompts), ("score", docs)):
        paths[task].write_text("".join(json.dumps(o) + "\n" for o in objects))
    return paths


def run(model: str, task: str, path: Path, out: Path, workers: int, batch_size: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable,
        "-m",
        "gpt2np",
        "batch",
        str(path),
        "--task",
        task,
        "--model",
        model,
        "--output",
        str(out),
        "--workers",
        str(workers),
        "--batch-size",
        str(batch_size),
        "--quiet",
    ]
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tokens = sum(r.get("new_tokens", r.get("tokens", 0)) for r in records)
    return {"seconds": seconds, "lines/s": len(records) / seconds, "tokens/s": tokens / seconds, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint folder or hub id (default: random weights, gpt2's shape)")
    parser.add_argument("--lines", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(random_checkpoint(tmp / "gpt2-random"))
        paths = write_inputs(tmp, args.lines, args.doc_tokens, args.new_tokens)
        print("| task | workers | lines | tokens | seconds | lines/s | tokens/s |\n|---|---|---|---|---|---|---|")
        for task, path in paths.items():
            outputs = []
            for workers in (1, 2):
                out = tmp / f"{task}-{workers}.jsonl"
                r = run(model, task, path, out, workers, args.batch_size)
                outputs.append(out.read_text())
                print(
                    f"| {task} | {workers} | {args.lines} | {r['tokens']} | {r['seconds']:.1f} | {r['lines/s']:.2f} "
                    f"| {r['tokens/s']:.1f} |",
                    flush=True,
                )
            assert outputs[0] == outputs[1], f"{task}: 1 and 2 workers wrote different records"


if __name__ == "__main__":
    main()
