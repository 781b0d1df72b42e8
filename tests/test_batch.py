"""`gpt2np batch`: records in input order, bad lines, resuming after a kill, 1 vs N workers.

The library is the oracle: a generate record's text is what `GPT2.generate` gives for that line's
prompt and seed, a score record's figures are `gpt2np.evaluate.perplexity`'s. The command runs as a
subprocess where the exit status, the kill or the worker processes matter; on a small random
checkpoint with GPT-2's full vocabulary, offline.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoints import TOY

from gpt2np import GPT2
from gpt2np.batch import EXIT_LINES_FAILED, run_batch
from gpt2np.batchwork import Job, Worker
from gpt2np.checkpoint import random_state_dict, save_checkpoint
from gpt2np.evaluate import perplexity

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 180
PROMPTS = [
    "Hello there",
    "Once upon a time",
    "",
    "The meaning of life is",
    "A",
    "In 1999, the",
    "def f(x):",
    "Dear Sir,",
    "Q: 2+2?\nA:",
    "It was a dark and stormy night",
]


def toy_checkpoint(folder: Path) -> Path:
    """Tiny dims, GPT-2's full vocabulary and tokenizer."""
    save_checkpoint(folder, TOY, random_state_dict(TOY, seed=0))
    return folder


def subprocess_env(cache: Path) -> dict:
    """No hub to reach (offline, a closed local port), an empty cache, gpt2np importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "GPT2NP_"))}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_OFFLINE="1",
        PYTHONIOENCODING="utf-8",
        HF_HUB_CACHE=str(cache),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return toy_checkpoint(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def model(checkpoint) -> GPT2:
    return GPT2.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return subprocess_env(tmp_path_factory.mktemp("empty_cache"))


def batch(argv, env, *, stdin=b"") -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "gpt2np", "batch", *map(str, argv)],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=REPO,
        timeout=TIMEOUT,
        check=False,
    )
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def run_lines(model, lines: list[str], **job) -> list[dict]:
    """run_batch in this process over `lines`; the records."""
    out = io.StringIO()
    run_batch(
        Job(model="unused", **job),
        io.BytesIO("".join(line + "\n" for line in lines).encode()),
        out,
        model=model,
        progress=False,
    )
    return [json.loads(line) for line in out.getvalue().splitlines()]


def generate_line(prompt: str, **params) -> str:
    return json.dumps({"prompt": prompt, **({"params": params} if params else {})})


def write_jsonl(path: Path, objects) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


# ---------------------------------------------------------------------------------------- generate
def test_seeded_line_n_draws_from_the_seeds_child_n_minus_1_whatever_the_batch(model):
    lines = [generate_line(p) for p in PROMPTS]
    expected = model.generate(PROMPTS, seed=7, max_new_tokens=12, return_full_text=False)
    for batch_size in (1, 3, 10):
        records = run_lines(model, lines, seed=7, batch_size=batch_size, defaults={"max_new_tokens": 12})
        assert [r["text"] for r in records] == expected, batch_size
        assert [r["id"] for r in records] == list(range(1, len(PROMPTS) + 1))


def test_a_lines_own_seed_and_params_give_what_generate_gives(model):
    lines = [
        generate_line("Hello", seed=3, top_k=5, max_new_tokens=9),
        generate_line("Hello", do_sample=False, max_new_tokens=9, return_full_text=True),
        json.dumps({"id": "x", "prompt": "Hi", "params": {"seed": 3, "repetition_penalty": 1.3}}),
    ]
    records = run_lines(model, lines, seed=0, batch_size=8)
    assert records[0]["text"] == model.generate("Hello", seed=3, top_k=5, max_new_tokens=9, return_full_text=False)
    assert records[1]["text"] == model.generate("Hello", do_sample=False, max_new_tokens=9)
    assert records[2] == {
        "id": "x",
        "text": model.generate("Hi", seed=3, repetition_penalty=1.3, max_new_tokens=50, return_full_text=False),
        "new_tokens": records[2]["new_tokens"],
        "finish_reason": records[2]["finish_reason"],
    }


def test_finish_reasons_length_stop_and_eos(model):
    greedy = {"do_sample": False, "max_new_tokens": 6}
    (ids,) = model.generate_ids([model.tokenizer.encode("Hello")], max_new_tokens=1, do_sample=False)
    first = model.tokenizer.decode(ids)
    stop_records = run_lines(
        model,
        [generate_line("Hello", stop=first[-1:] or "x", **greedy), generate_line("Hello", ignore_eos=True, **greedy)],
    )
    assert stop_records[0]["finish_reason"] == "stop" and stop_records[0]["new_tokens"] == 1
    assert stop_records[1] == {
        "id": 2,
        "text": model.generate("Hello", **greedy, return_full_text=False),
        "new_tokens": 6,
        "finish_reason": "length",
    }
    # The same weights with the greedy first token as EOS: the row ends at once, by EOS.
    eos_model = GPT2(dataclasses.replace(model.config, eos_token_id=ids[0]), model.params, model.tokenizer)
    (record,) = run_lines(eos_model, [generate_line("Hello", **greedy)])
    assert record == {"id": 1, "text": "", "new_tokens": 0, "finish_reason": "eos"}


BAD_LINES = [
    (b"not json", "is not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"id": "m"}', 'has no "prompt"'),
    (b'{"prompt": 5}', "prompt must be a string"),
    (b'{"prompt": "a", "temperature": 0.5}', 'unknown key "temperature"'),
    (b'{"prompt": "a", "params": {"top_p": 2}}', "params.top_p must be in (0, 1]"),
    (b'{"prompt": "a", "params": {"max_new_tokens": true}}', "params.max_new_tokens must be an integer, got true"),
    (b'{"prompt": "a", "params": {"colour": 1}}', 'unknown param "colour" in params'),
    (b'{"prompt": "a", "params": {"max_new_tokens": 200}}', "params.max_new_tokens is 200, more than the model's"),
    (b'{"id": [1], "prompt": "a"}', "id must be a string or an integer"),
    (b'{"prompt": "caf\xe9"}', "is not UTF-8 text"),
]


def test_bad_lines_get_error_records_in_place_and_exit_3(checkpoint, model, env, tmp_path):
    prompts = (PROMPTS * 2)[: len(BAD_LINES) + 1]
    good = [generate_line(p, do_sample=False, max_new_tokens=5) for p in prompts]
    lines = [good[0].encode()]
    for (bad, _), line in zip(BAD_LINES, good[1:]):
        lines += [bad, b"", line.encode()]  # a blank line is skipped, its number still counts
    result = batch(["-", "--task", "generate", "--model", checkpoint, "--quiet"], env, stdin=b"\n".join(lines))
    assert result.returncode == EXIT_LINES_FAILED, result.stderr
    assert result.stderr == ""
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 1 + 2 * len(BAD_LINES)
    expected = model.generate(prompts, do_sample=False, max_new_tokens=5, return_full_text=False)
    assert [r["text"] for r in records[::2]] == expected, "a bad line changed its neighbours"
    for (bad, message), record, number in zip(BAD_LINES, records[1::2], range(2, 100, 3)):
        assert message in record["error"], (bad, record)
        assert record["id"] == ("m" if b'"m"' in bad else number)
    noisy = batch(["-", "--task", "generate", "--model", checkpoint], env, stdin=b"oops\n")
    assert noisy.returncode == EXIT_LINES_FAILED
    assert noisy.stderr.splitlines()[-1] == 'gpt2np batch: note: 1 line failed: their records carry an "error"'


def test_plain_text_lines_are_prompts_and_documents(model):
    greedy = {"do_sample": False, "max_new_tokens": 4}
    records = run_lines(model, ["Hello", "", "World"], input_format="text", defaults=greedy)
    assert [r["text"] for r in records] == model.generate(["Hello", "", "World"], **greedy, return_full_text=False)
    scores = run_lines(model, ["a cat", "x", ""], input_format="text", task="score")
    assert scores[0]["tokens"] == 1 and "error" in scores[1] and "error" in scores[2]


# ---------------------------------------------------------------------------------------- score
def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the a cat dog ran over hill quick brown fox jumps lazy house river tree, and. Then".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 150))) for _ in range(n)]


def test_scores_are_perplexitys_with_sliding_windows(model):
    texts = documents(12)
    assert max(len(model.tokenizer.encode(t)) for t in texts) > 64  # several windows
    for prepend_eot in (False, True):
        records = run_lines(
            model,
            [json.dumps({"text": t}) for t in texts],
            task="score",
            max_length=64,
            stride=32,
            prepend_eot=prepend_eot,
            batch_size=5,
        )
        for text, record in zip(texts, records):
            want = perplexity(model, text, max_length=64, stride=32, prepend_eot=prepend_eot, progress=False)
            assert record["tokens"] == want["tokens"]
            assert record["logprob_sum"] == pytest.approx(-want["nll"] * want["tokens"], rel=1e-6)
            assert record["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
            assert record["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-6)


# ---------------------------------------------------------------------------------------- order, workers
def mixed_input(path: Path, n: int = 24) -> Path:
    """Generate lines, sampled and greedy, of different lengths, with a few bad ones."""
    rng = random.Random(1)
    objects = []
    for i in range(n):
        params = {"max_new_tokens": rng.randint(1, 12)} | ({"do_sample": False} if i % 3 == 0 else {})
        objects.append({"id": f"line-{i}", "prompt": rng.choice(PROMPTS) * rng.randint(1, 3), "params": params})
        if i % 7 == 6:
            objects.append({"id": f"bad-{i}", "params": {}})
    return write_jsonl(path, objects)


def test_one_and_two_workers_write_the_same_output(checkpoint, env, tmp_path):
    """Generate (seeded) byte for byte, and score within float rounding, in input order."""
    generate = mixed_input(tmp_path / "in.jsonl")
    score = write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "text": t} for i, t in enumerate(documents(20))])
    for task, path, extra in (("generate", generate, ["--seed", "5"]), ("score", score, ["--max-length", "48"])):
        outputs = []
        for workers in (1, 2):
            out = tmp_path / f"{task}-{workers}.jsonl"
            result = batch(
                [
                    path,
                    "--task",
                    task,
                    "--model",
                    checkpoint,
                    "--output",
                    out,
                    "--workers",
                    workers,
                    "--batch-size",
                    4,
                    "--quiet",
                    *extra,
                ],
                env,
            )
            assert result.returncode in (0, EXIT_LINES_FAILED), result.stderr
            outputs.append(out.read_text())
        if task == "generate":
            assert outputs[0] == outputs[1], task
        else:  # a process's BLAS thread count (2 cores vs 1 each) may change the last bits of a product
            one, two = ([json.loads(line) for line in text.splitlines()] for text in outputs)
            assert [r.keys() for r in one] == [r.keys() for r in two] and len(one) == len(two)
            for a, b in zip(one, two):
                for key, value in a.items():
                    assert b[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
        ids = [json.loads(line)["id"] for line in outputs[0].splitlines()]
        input_ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
        assert ids == input_ids, "not in input order"


# ---------------------------------------------------------------------------------------- resuming
def test_resume_after_a_kill_at_a_random_line_loses_and_repeats_nothing(checkpoint, env, tmp_path):
    """Kill the job (SIGKILL) when a random number of lines is written, cut a line short as a kill
    mid-write would, run it again: the output is the uninterrupted run's, byte for byte (a chunk
    that was partly written is run whole again, so each line is batched as it was)."""
    rng = random.Random(os.getpid())
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"prompt": f"Line {i} says", "params": {"max_new_tokens": 40}} for i in range(30)]
    )
    argv = [path, "--task", "generate", "--model", checkpoint, "--seed", "11", "--batch-size", "3", "--quiet"]
    whole = batch([*argv, "--output", tmp_path / "whole.jsonl"], env)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "resumed.jsonl"
    kill_at = rng.randint(1, 25)
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2np", "batch", *map(str, argv), "--output", str(out)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while process.poll() is None and (not out.exists() or out.read_text().count("\n") < kill_at):
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(TIMEOUT)
    written = out.read_bytes()
    assert process.returncode == -signal.SIGKILL and written.count(b"\n") < 30, "the job ended before the kill"
    cut = written.rfind(b"\n", 0, len(written) - 1) + 1 + rng.randint(1, 20)
    out.write_bytes(written[:cut])  # the last line cut short, as if killed while writing it
    again = batch([*argv, "--output", out], env)
    assert again.returncode == 0, again.stderr
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text(), f"killed at line {kill_at}"
    assert batch([*argv, "--output", out], env).returncode == 0  # a finished job: nothing to do
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_an_output_from_another_input_is_refused(checkpoint, env, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    out = write_jsonl(tmp_path / "out.jsonl", [{"id": "zzz", "text": "", "new_tokens": 0, "finish_reason": "eos"}])
    result = batch([path, "--task", "generate", "--model", checkpoint, "--output", out, "--quiet"], env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and 'has id "zzz" but the input\'s line 1 has id "a"' in result.stderr
    assert out.read_text().count("\n") == 1


def test_errors_of_the_command_are_one_line(checkpoint, env, tmp_path):
    result = batch([tmp_path / "missing.jsonl", "--task", "score", "--model", checkpoint], env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "cannot read" in result.stderr
    result = batch(["-", "--task", "generate", "--model", checkpoint, "--temperature", "0"], env)
    assert result.returncode == 2 and "temperature must be > 0 when sampling" in result.stderr
    result = batch(["-", "--task", "generate", "--model", tmp_path / "nowhere"], env)
    assert result.returncode == 2 and "cannot load the model" in result.stderr


def test_ray_not_installed_is_one_line(checkpoint, monkeypatch, capsys):
    import importlib.util

    from gpt2np import batch as batch_module

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    assert batch_module.main(["-", "--task", "score", "--model", str(checkpoint), "--ray"]) == 2
    expected = 'gpt2np batch: error: --ray needs Ray Data, which is not installed: pip install "gpt2np[ray]"\n'
    assert capsys.readouterr().err == expected


def test_the_worker_is_reusable_and_holds_no_state_between_chunks(model):
    """A chunk gives the same records whenever it runs: what lets N workers and Ray match one."""
    from gpt2np.batchwork import Line

    worker = Worker(Job(seed=2, defaults={"max_new_tokens": 5}), model)
    chunk = [Line(i + 1, generate_line(p)) for i, p in enumerate(PROMPTS[:4])]
    first = worker(chunk)
    worker([Line(9, generate_line("other"))])
    assert worker(chunk) == first


def test_the_input_is_read_as_a_stream(model):
    """An endless input: the job reads only as far as it has written (bounded memory), here one chunk
    ahead when the output fails after three chunks."""
    read = []

    def endless():
        for n in itertools.count(1):
            read.append(n)
            yield generate_line(f"Line {n}", max_new_tokens=1).encode() + b"\n"

    class Full(io.StringIO):
        def write(self, text):
            if self.getvalue().count("\n") >= 6:
                raise OSError("disk full")
            return super().write(text)

    with pytest.raises(OSError, match="disk full"):
        run_batch(Job(model="unused", batch_size=2), endless(), Full(), model=model, progress=False)
    assert len(read) <= 10


def test_without_ray_the_job_never_imports_ray(checkpoint, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "params": {"max_new_tokens": 2}}])
    code = (
        "import sys\nfrom gpt2np.batch import main\n"
        f"status = main([{str(path)!r}, '--task', 'generate', '--model', {str(checkpoint)!r}, '--quiet'])\n"
        "assert status == 0 and 'ray' not in sys.modules, (status, [m for m in sys.modules if 'ray' in m][:3])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=TIMEOUT,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr


def test_ctrl_c_stops_the_workers_says_one_line_and_the_job_resumes(checkpoint, env, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while 2 workers run: status 130,
    one line, no worker left behind; the same command with 1 worker then finishes the file as an
    uninterrupted run writes it."""
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"prompt": f"Line {i} says", "params": {"max_new_tokens": 40}} for i in range(60)]
    )
    argv = [
        sys.executable,
        "-m",
        "gpt2np",
        "batch",
        str(path),
        "--task",
        "generate",
        "--model",
        str(checkpoint),
        "--seed",
        "4",
        "--batch-size",
        "2",
        "--quiet",
    ]
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        [*argv, "--output", str(out), "--workers", "2"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        while process.poll() is None and (not out.exists() or out.read_text().count("\n") < 6):
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    assert (process.returncode, err.decode()) == (130, "gpt2np batch: interrupted\n")
    assert out.read_text().count("\n") < 60, "the job ended before the interrupt"
    assert group_ends(process.pid, within=20), "a worker outlived the interrupted job"
    finished = subprocess.run([*argv, "--output", str(out)], env=env, cwd=REPO, capture_output=True, check=False)
    whole = subprocess.run([*argv, "--output", str(tmp_path / "whole.jsonl")], env=env, cwd=REPO, check=False)
    assert (finished.returncode, whole.returncode) == (0, 0), finished.stderr
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def group_ends(group: int, *, within: float) -> bool:
    """True once no process of the group is left (a worker ended but not yet reaped counts until it is)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
