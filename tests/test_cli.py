"""The command line, run as a user runs it: `scripts/generate.py` and `python -m gpt2np` in a
subprocess, on a small random checkpoint, with the hub out of reach (offline, and its endpoint a
closed local port). The library, loaded here, is the oracle for what the text must be."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from gpt2np import GPT2, cli, console
from gpt2np.checkpoint import random_state_dict, save_checkpoint
from gpt2np.config import GPT2Config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "generate.py"
PROMPT = "I believe the meaning of life is"
# The model card's sample request, as published with GPT-2's inference endpoint.
MODEL_CARD_REQUEST = {
    "input_data": ["I believe the meaning of life is"],
    "params": {"top_p": 1.0, "temperature": 0.8, "max_new_tokens": 100, "do_sample": True, "return_full_text": True},
}
TIMEOUT = 120  # seconds; a hung subprocess fails the test instead of the whole run


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """The environment of every subprocess: no hub to reach, an empty cache, UTF-8 output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "GPT2NP_"))}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_OFFLINE="1",
        PYTHONIOENCODING="utf-8",
        HF_HUB_CACHE=str(tmp_path_factory.mktemp("empty_cache")),
    )
    return env


def run(argv, env, *, stdin=None, module=False, cwd=None) -> subprocess.CompletedProcess:
    """Run scripts/generate.py (from outside the repository, as a fresh checkout would), or
    `python -m gpt2np` (from the repository root). `stdin` is text (or bytes) to feed, a file
    descriptor, or None for an empty stdin. stdout and stderr come back as str."""
    if module:
        command, cwd = [sys.executable, "-m", "gpt2np", *argv], cwd or REPO
    else:
        command, cwd = [sys.executable, str(SCRIPT), *argv], cwd or REPO.parent
    if isinstance(stdin, (str, bytes)):
        feed = {"input": stdin.encode() if isinstance(stdin, str) else stdin}
    else:  # a file descriptor (a terminal), or nothing to read
        feed = {"stdin": subprocess.DEVNULL if stdin is None else stdin}
    result = subprocess.run(command, **feed, capture_output=True, env=env, cwd=cwd, timeout=TIMEOUT)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def assert_usage_error(result, *needles, prog="generate.py"):
    """Exit status 2, nothing on stdout, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"{prog}: error: "), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def run_in_process(argv, monkeypatch, capsys, *, stdin=""):
    """cli.main in this process (no interpreter start-up): for the many variants of one error path
    whose subprocess run is tested once. Returns (status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(read=lambda: stdin, isatty=lambda: False))
    status = cli.main(argv, prog="gpt2np")
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, out, err, *needles):
    assert (status, out) == (2, ""), err
    assert err.startswith("gpt2np: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


# ---------------------------------------------------------------------------------------- generate
def test_prompt_argument_prints_the_prompt_and_its_continuation(toy_folder, toy_model, env):
    result = run(["--model", str(toy_folder), PROMPT, "--seed", "0", "--max-new-tokens", "10"], env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    expected = toy_model.generate(PROMPT, seed=0, max_new_tokens=10)
    assert expected.startswith(PROMPT) and len(expected) > len(PROMPT)
    assert result.stdout == expected + "\n"


def test_python_m_gpt2np_runs_generate_with_or_without_the_command(toy_folder, toy_model, env, monkeypatch, capsys):
    expected = toy_model.generate(PROMPT, seed=3, max_new_tokens=4) + "\n"
    result = run([PROMPT, "--model", str(toy_folder), "--seed", "3", "--max-new-tokens", "4"], env, module=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, expected, "")
    argv = ["generate", PROMPT, "--model", str(toy_folder), "--seed", "3", "--max-new-tokens", "4"]
    assert run_in_process(argv, monkeypatch, capsys) == (0, expected, "")


def test_prompt_from_stdin_when_absent_or_dash(toy_folder, toy_model, env, monkeypatch, capsys):
    expected = toy_model.generate(PROMPT, seed=1, max_new_tokens=4) + "\n"
    options = ["--model", str(toy_folder), "--seed", "1", "--max-new-tokens", "4"]
    result = run(options, env, stdin=PROMPT + "\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, expected, "")
    assert run_in_process(["-", *options], monkeypatch, capsys, stdin=PROMPT + "\n") == (0, expected, "")


def test_every_sampling_flag_reaches_generate(toy_folder, toy_model, env):
    argv = [
        "--model",
        str(toy_folder),
        PROMPT,
        "--seed",
        "7",
        "--max-new-tokens",
        "15",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--repetition-penalty",
        "1.3",
        "--stop",
        "\\n",
        "--stop",
        "ab",
        "--no-full-text",
        "--ignore-eos",
    ]
    result = run(argv, env)
    assert result.returncode == 0, result.stderr
    expected = toy_model.generate(
        PROMPT,
        seed=7,
        max_new_tokens=15,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        repetition_penalty=1.3,
        stop=["\n", "ab"],
        return_full_text=False,
        ignore_eos=True,
    )
    assert result.stdout == expected + "\n"


def test_greedy_is_do_sample_off_and_ignores_temperature(toy_folder, toy_model, monkeypatch, capsys):
    argv = ["--model", str(toy_folder), PROMPT, "--greedy", "--temperature", "0", "--max-new-tokens", "12"]
    expected = toy_model.generate(PROMPT, do_sample=False, max_new_tokens=12) + "\n"
    assert run_in_process(argv, monkeypatch, capsys) == (0, expected, "")


@pytest.mark.parametrize("flag", ["--temperature", "--repetition-penalty"])
def test_values_at_the_edge_of_float32_generate(flag, toy_folder, toy_model, monkeypatch, capsys):
    """1e-300 once gave an empty text (temperature) or an "internal error" (IndexError, repetition penalty)."""
    argv = ["--model", str(toy_folder), PROMPT, flag, "1e-300", "--max-new-tokens", "6", "--seed", "0", "--ignore-eos"]
    option = {flag[2:].replace("-", "_"): 1e-300}
    expected = toy_model.generate(PROMPT, max_new_tokens=6, seed=0, ignore_eos=True, **option)
    assert run_in_process(argv, monkeypatch, capsys) == (0, expected + "\n", "")
    assert len(expected) > len(PROMPT)


def test_stream_prints_the_same_samples_as_no_stream(toy_folder, toy_model, env):
    argv = ["--model", str(toy_folder), PROMPT, "--seed", "5", "--max-new-tokens", "16", "--num-samples", "2"]
    streamed, printed = run([*argv, "--stream"], env), run([*argv, "--no-stream"], env)
    assert streamed.returncode == printed.returncode == 0, (streamed.stderr, printed.stderr)
    first, second = toy_model.generate([PROMPT, PROMPT], seed=5, max_new_tokens=16)
    assert first != second
    assert printed.stdout == f"=== sample 1 of 2 ===\n{first}\n=== sample 2 of 2 ===\n{second}\n"
    assert streamed.stdout == printed.stdout


def test_truncate_prompt_keeps_the_last_tokens_that_fit(toy_folder, toy_model, env, monkeypatch, capsys):
    prompt = "one" + " word" * 200  # 201 tokens: "one", then " word" 200 times
    argv = ["--model", str(toy_folder), prompt, "--truncate-prompt", "--max-new-tokens", "10", "--seed", "0"]
    result = run(argv, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == toy_model.generate(" word" * 118, seed=0, max_new_tokens=10) + "\n"  # 128 - 10 tokens kept
    assert result.stderr == (
        "generate.py: note: the prompt is too long: kept its last 118 tokens, so that "
        "--max-new-tokens 10 fits the 128-token context\n"
    )
    argv = ["--model", str(toy_folder), prompt, "--truncate-prompt", "--max-new-tokens", "3", "--quiet"]
    status, _, err = run_in_process(argv, monkeypatch, capsys)
    assert (status, err) == (0, "")


# ---------------------------------------------------------------------------------------- JSON requests
def test_json_request_of_the_model_card(toy_folder, toy_model, env, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps(MODEL_CARD_REQUEST, indent=4))
    result = run(["--model", str(toy_folder), "--json", str(request), "--seed", "0"], env)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer == toy_model.generate(MODEL_CARD_REQUEST["input_data"], seed=0, **MODEL_CARD_REQUEST["params"])
    assert len(answer) == 1 and answer[0].startswith(PROMPT)


def test_json_request_on_stdin_in_azure_ml_shape(toy_folder, toy_model, env):
    prompts = ["Once upon a time,", "My name is John and I am"]
    params = {"max_new_tokens": 12, "do_sample": False, "return_full_text": False, "stop": ["\n"]}
    request = {"input_data": {"input_string": prompts, "parameters": params}}
    result = run(["--model", str(toy_folder), "--json", "-"], env, stdin=json.dumps(request))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == toy_model.generate(prompts, **params)


def test_json_params_override_flags_and_num_samples_repeats_each_prompt(toy_folder, toy_model, tmp_path, capsys):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"input_data": ["a", "b"], "params": {"max_new_tokens": 4, "seed": 2}}))
    status = cli.main(
        [
            "--model",
            str(toy_folder),
            "--json",
            str(request),
            "--max-new-tokens",
            "30",
            "--seed",
            "9",
            "--num-samples",
            "2",
        ],
        prog="gpt2np",
    )
    out = capsys.readouterr().out
    assert status == 0
    assert json.loads(out) == toy_model.generate(["a", "a", "b", "b"], max_new_tokens=4, seed=2)


@pytest.mark.parametrize(
    "request_text, needles",
    [
        ('{"input_data": ["a"], ', ["is not valid JSON", '"input_data"']),
        ('["a prompt"]', ["must be a JSON object like"]),
        ('{"params": {}}', ['no "input_data"']),
        ('{"input_data": "a prompt"}', ["input_data must be a non-empty list", "wrap a single prompt"]),
        ('{"input_data": []}', ["input_data must be a non-empty list"]),
        ('{"input_data": ["a", 3]}', ["input_data[1] must be a string, got 3"]),
        ('{"input_data": ["a"], "parameters": {}}', ['unknown key "parameters" in the request', '"params"']),
        ('{"input_data": ["a"], "params": [1]}', ["params must be a JSON object"]),
        ('{"input_data": ["a"], "params": {"temperature": true}}', ["params.temperature must be a number, got true"]),
        (
            '{"input_data": ["a"], "params": {"max_new_tokens": "50"}}',
            ['params.max_new_tokens must be an integer, got "50"'],
        ),
        ('{"input_data": ["a"], "params": {"do_sample": 1}}', ["params.do_sample must be true or false, got 1"]),
        ('{"input_data": ["a"], "params": {"seed": -1}}', ["params.seed must be a non-negative integer, got -1"]),
        ('{"input_data": ["a"], "params": {"top_p": 2}}', ["top_p must be in (0, 1]"]),
        ('{"input_data": ["a"], "params": {"temperature": NaN}}', ["not valid JSON", "NaN"]),
        ('{"input_data": {"input_string": ["a"], "params": {}}}', ['unknown key "params" in input_data']),
        (
            '{"input_data": {"input_string": ["a"], "parameters": {"top_k": 0}}}',
            ["input_data.parameters.top_k must be >= 1"],
        ),
    ],
)
def test_malformed_json_requests_are_one_line_errors(request_text, needles, monkeypatch, capsys):
    """Checked before any model is loaded (in-process; the subprocess path is tested below)."""
    result = run_in_process(["--model", "/no/model/needed", "--json", "-"], monkeypatch, capsys, stdin=request_text)
    assert_one_line_error(*result, "gpt2np: error: the request on stdin", *needles)


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv, stdin, needles",
    [
        (["x", "--top-p", "2"], None, ["argument --top-p: must be in (0, 1]", "--help"]),  # a bad flag value
        (["x", "--model", "/no/such/folder"], None, ["cannot load the model '/no/such/folder'", "existing folder"]),
        (["x", "--model", "someorg/missing"], None, ["cannot load the model 'someorg/missing': "]),
        (
            ["one" + " word" * 200],
            None,
            [
                "the prompt is 201 tokens, which leaves no room to generate",
                "128-token context",
                "--truncate-prompt to keep its last 78 tokens",
            ],
        ),
        (["--json", "-"], '{"input_data": ["a"], "params": {', ["the request on stdin: the request is not valid JSON"]),
        (
            ["--json", "-"],
            '{"input_data": ["a"], "params": {"num_beams": 4}}',
            ['unknown param "num_beams"', "top_p, temperature, max_new_tokens, do_sample, return_full_text"],
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(argv, stdin, needles, toy_folder, env, tmp_path):
    argv = ["--model", str(toy_folder), *argv] if "--model" not in argv else argv
    assert_usage_error(run(argv, env, stdin=stdin, cwd=tmp_path), *needles)


@pytest.mark.parametrize(
    "argv, stdin, needles",
    [
        (["x", "--temprature", "1"], "", ["unrecognized arguments: --temprature"]),
        (["x", "--temperature", "hot"], "", ["argument --temperature: must be a number, got 'hot'"]),
        (["x", "--temperature", "inf"], "", ["argument --temperature: must be a finite number"]),
        (["x", "--max-new-tokens", "0"], "", ["argument --max-new-tokens: must be at least 1"]),
        (["x", "--top-k", "1.5"], "", ["argument --top-k: must be an integer"]),
        (["x", "--seed", "-3"], "", ["argument --seed: must be 0 or more"]),
        (["x", "--repetition-penalty", "0"], "", ["argument --repetition-penalty: must be more than 0"]),
        (["x", "--stop", ""], "", ["argument --stop: must not be empty"]),
        (["x", "--temperature", "0"], "", ["--temperature must be > 0 when sampling", "--greedy"]),
        (["x", "--json", "request.json"], "", ["either a PROMPT or --json FILE"]),
        (["--json", "missing.json"], "", ["--json missing.json: no such file"]),
        ([], "", ["stdin was empty"]),
        (["--json", "-", "--stream"], "{}", ["--stream cannot be used with --json"]),
        (["a prompt", "--max-new-tokens", "127"], "", ["the prompt is 2 tokens", "lower --max-new-tokens to 126"]),
        (["x", "--max-new-tokens", "128", "--truncate-prompt"], "", ["leaves no room for a prompt", "at most 127"]),
        (
            ["--json", "-"],
            '{"input_data": ["a"], "params": {"max_new_tokens": 500}}',
            [
                "params.max_new_tokens is 500, more than the model's 128-token context",
                "lower params.max_new_tokens to 127",
            ],
        ),
        (
            ["--json", "-"],
            json.dumps({"input_data": ["a", "b" * 300], "params": {"max_new_tokens": 100}}),
            ["input_data[1] is 150 tokens, which leaves no room", "or pass --truncate-prompt"],
        ),
        (
            ["--json", "-", "--max-new-tokens", "100"],
            json.dumps({"input_data": [" a" * 50]}),  # a flag, not a param
            ["input_data[0] is 50 tokens and --max-new-tokens is 100", "lower --max-new-tokens to 78"],
        ),
    ],
)
def test_more_bad_input_is_one_line_and_exit_status_2(argv, stdin, needles, toy_folder, monkeypatch, capsys):
    result = run_in_process(["--model", str(toy_folder), *argv], monkeypatch, capsys, stdin=stdin)
    assert_one_line_error(*result, *needles)


@pytest.mark.parametrize("n", [128, 150])
def test_a_prompt_that_fills_the_context_is_told_to_shorten(n, toy_folder, monkeypatch, capsys):
    """Not to lower --max-new-tokens to 0 or below: no number of new tokens would make it fit."""
    status, out, err = run_in_process(["--model", str(toy_folder), " a" * n], monkeypatch, capsys)
    assert_one_line_error(
        status,
        out,
        err,
        f"the prompt is {n} tokens, which leaves no room to generate in the model's 128-token context; shorten it",
        "--truncate-prompt to keep its last 78 tokens",
    )
    assert "lower --max-new-tokens" not in err


def test_debug_shows_the_traceback(monkeypatch, capsys):
    status, out, err = run_in_process(["x", "--model", "/no/such/folder", "--debug"], monkeypatch, capsys)
    assert (status, out) == (2, "")
    assert err.startswith("Traceback") and "ValueError: no checkpoint folder" in err
    assert err.splitlines()[-1].startswith("gpt2np: error: cannot load the model")


@pytest.mark.parametrize("argv", [[], ["--json", "-"]])
def test_stdin_that_is_not_utf8_is_one_line(argv, toy_folder, env):
    """Under a UTF-8 locale Python reads stdin with surrogate escapes: the bytes were once taken as a
    prompt and echoed back."""
    stdin = b"ab\xff\xfe" if not argv else b'{"input_data": ["\xff"]}'
    utf8_locale = {k: v for k, v in env.items() if k != "PYTHONIOENCODING"} | {"LC_ALL": "C.UTF-8"}
    result = run(["--model", str(toy_folder), *argv], utf8_locale, stdin=stdin)
    assert_usage_error(result, "on stdin is not text in the utf-8 encoding (invalid start byte); pass UTF-8 text")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_no_prompt_and_stdin_a_terminal(toy_folder, env):
    controller, terminal = os.openpty()
    try:
        result = run(["--model", str(toy_folder)], env, stdin=terminal)
    finally:
        os.close(controller)
        os.close(terminal)
    assert_usage_error(result, "no prompt", "pipe it on stdin", "--json FILE")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_exits_130_and_keeps_what_was_printed(tmp_path, env):
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=1024)  # room for a long generation
    save_checkpoint(tmp_path / "long", config, random_state_dict(config, seed=1))
    argv = [
        "--model",
        str(tmp_path / "long"),
        PROMPT,
        "--max-new-tokens",
        "1000",
        "--ignore-eos",
        "--seed",
        "0",
        "--stream",
    ]
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        printed = b""
        while len(printed) <= len(PROMPT):  # the prompt, then at least one generated piece
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, process.stderr.read().decode()
            printed += chunk
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    printed = (printed + rest).decode()
    assert process.returncode == 130, err.decode()
    assert err.decode() == "generate.py: interrupted\n"
    # What was printed is intact: exactly the first pieces of the same generation.
    expected = ""
    for piece in GPT2.from_pretrained(tmp_path / "long").stream(PROMPT, max_new_tokens=1000, ignore_eos=True, seed=0):
        if len(expected) >= len(printed):
            break
        expected += piece
    assert printed == expected
    assert printed.startswith(PROMPT) and len(printed) < 3000


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("flags", [["--no-stream"], ["--stream"], ["--help"]])
def test_a_full_disk_is_one_line_and_status_1(flags, toy_folder, env):
    """Once "internal error ... please report it"."""
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--model", str(toy_folder), PROMPT, *flags],
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
            env=env,
            timeout=TIMEOUT,
        )
    assert result.returncode == 1
    assert result.stderr.decode() == "generate.py: error: cannot write the output: No space left on device\n"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file descriptors")
@pytest.mark.parametrize("argv", [[PROMPT], ["download", "--help"]])
def test_a_closed_stdout_is_one_line_and_status_1(argv, toy_folder, env):
    """`gpt2np ... >&-`: said before any model is loaded; once "internal error ... please report it"."""
    command = [sys.executable, "-m", "gpt2np", *argv, "--model", str(toy_folder)]
    if argv[0] == "download":
        command = command[:-2]
    closed = {"preexec_fn": lambda: os.close(1)}  # the child starts without a descriptor 1
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO, timeout=TIMEOUT, **closed
    )
    assert result.returncode == 1
    assert result.stderr.decode() == "python -m gpt2np: error: cannot write the output: stdout is closed\n"


def wait_until_mapped(process: subprocess.Popen, name: str) -> None:
    """Until the process has mapped a file whose path holds `name` (Linux's /proc/PID/maps): a shared
    library being imported. Polled every millisecond."""
    deadline = time.monotonic() + TIMEOUT
    while name not in Path(f"/proc/{process.pid}/maps").read_text():
        assert process.poll() is None, process.communicate()[1].decode()
        assert time.monotonic() < deadline, f"{name} was never mapped"
        time.sleep(0.001)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see NumPy being imported")
def test_ctrl_c_while_importing_exits_130_without_a_traceback(tmp_path, env):
    """SIGINT while `python -m gpt2np` imports NumPy and the modules after it, some 30 to 150 ms after
    it started: once a KeyboardInterrupt traceback from the package's __init__. Landing there, the
    interrupt can also be swallowed by NumPy's C code (an ImportError instead), by an import lock's
    callback ("Exception ignored"), or pass through exec() (CPython then ends the process by SIGINT)."""
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=1024)  # a long generation, should no signal land
    save_checkpoint(tmp_path / "long", config, random_state_dict(config, seed=1))
    argv = [
        sys.executable,
        "-m",
        "gpt2np",
        PROMPT,
        "--model",
        str(tmp_path / "long"),
        "--max-new-tokens",
        "1000",
        "--ignore-eos",
    ]
    for extra in (0, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08):  # after NumPy's core is mapped
        started = time.monotonic()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            wait_until_mapped(process, "_multiarray_umath")
            time.sleep(extra)
            process.send_signal(signal.SIGINT)
            after = time.monotonic() - started
            _, err = process.communicate(timeout=TIMEOUT)
        finally:
            process.kill()
        assert (process.returncode, err.decode()) == (130, "python -m gpt2np: interrupted\n"), (extra, after)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_in_eval_is_said_once(toy_folder, env, tmp_path):
    """`gpt2np eval` runs inside gpt2np's own main: once both said they were interrupted."""
    data = tmp_path / "ptb.test.txt"
    data.write_text(" the cat sat on the mat \n" * 200_000)  # seconds of tokenizing and scoring
    argv = [
        sys.executable,
        "-m",
        "gpt2np",
        "eval",
        "--model",
        str(toy_folder),
        "--task",
        "ptb",
        "--data",
        str(data),
        "--quiet",
    ]
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        time.sleep(1.0)  # importing, loading, tokenizing or scoring: wherever it lands, the command is running
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    assert (process.returncode, err.decode()) == (130, "gpt2np eval: interrupted\n")


# ---------------------------------------------------------------------------------------- help
def test_help_shows_every_flag_with_its_default_and_the_model_card_example(env):
    result = run(["--help"], env)
    assert result.returncode == 0 and result.stderr == ""
    help_text = result.stdout
    words = " ".join(help_text.split())
    parser = cli.generate_parser("generate.py")
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        for flag in action.option_strings:
            assert flag in help_text, flag
        assert "default" in action.help, action.option_strings or action.dest
    for default in ("(default: gpt2)", "(default: 50)", "(default: 0.8)", "(default: 1.0)", "(default: off)"):
        assert default in words
    assert '"input_data": [\n          "I believe the meaning of life is"' in help_text
    assert '"return_full_text": true' in help_text


def test_flag_defaults_are_generation_options_defaults():
    """The flags have no defaults of their own: an empty command line gives GenerationOptions()."""
    from dataclasses import fields

    from gpt2np.sampling import GenerationOptions

    args = cli.generate_parser("gpt2np").parse_args([])
    defaults = GenerationOptions()
    for field in fields(GenerationOptions):
        if field.name != "stop":  # --stop is repeatable: no flag given is None, read as no stop string
            assert getattr(args, field.name) == getattr(defaults, field.name), field.name
    assert args.stop is None and defaults.stop == ()


def test_top_level_help_lists_the_commands(capsys):
    assert cli.main(["--help"], prog="python -m gpt2np") == 0
    out = capsys.readouterr().out
    for command in ("generate", "download", "serve", "eval"):
        assert f"python -m gpt2np {command}" in out


# ---------------------------------------------------------------------------------------- download
def test_download_prints_the_snapshot_folder_and_generate_loads_it(tmp_path, env, toy_model):
    cache, commit = tmp_path / "cache", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=128)
    save_checkpoint(repo / "snapshots" / commit, config, random_state_dict(config, seed=0))

    result = run(["download", "someorg/tiny", "--cache-dir", str(cache), "--quiet"], env, module=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{repo / 'snapshots' / commit}\n", "")

    argv = ["--model", "someorg/tiny", "--cache-dir", str(cache), PROMPT, "--seed", "0", "--max-new-tokens", "5"]
    result = run(argv, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == toy_model.generate(PROMPT, seed=0, max_new_tokens=5) + "\n"  # the same weights


def test_download_of_a_missing_model_is_one_line(env):
    result = run(["download", "someorg/missing", "--quiet"], env, module=True)
    assert_usage_error(result, "cannot download 'someorg/missing': ", prog="python -m gpt2np")


# ---------------------------------------------------------------------------------------- serve, eval
@pytest.mark.parametrize("command, module", [("serve", "gpt2np.server"), ("eval", "gpt2np.evaluate")])
def test_serve_and_eval_pass_their_arguments_through(command, module, monkeypatch):
    received = []
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(main=lambda argv: received.append(argv) or 3))
    assert cli.main([command, "--port", "8000", "--", "-x"], prog="gpt2np") == 3
    assert received == [["--port", "8000", "--", "-x"]]


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["serve", "--port", "99999"], ["argument --port: must be in 0..65535", "(see gpt2np serve --help)"]),
        (["serve", "--max-queue", "0"], ["argument --max-queue: must be at least 1, got 0"]),
        (["serve", "--model", "/nonexistent"], ["cannot load the model '/nonexistent': no checkpoint folder"]),
        (["eval", "--model", "/nonexistent", "--task", "ptb", "--data", "x"], ["cannot load the model '/nonexistent'"]),
        (["eval", "--task", "nope"], ["argument --task: invalid choice: 'nope'"]),
    ],
)
def test_serve_and_eval_keep_the_one_line_promise(argv, needles, env):
    """The same parser and errors as generate: once five lines of usage (a bad --port) or status 1 (no model)."""
    assert_usage_error(run(argv, env, module=True), *needles, prog=f"gpt2np {argv[0]}")


def test_a_missing_command_module_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gpt2np.server", None)  # makes `import gpt2np.server` fail
    assert cli.main(["serve"], prog="gpt2np") == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2np: error: the 'serve' command is not available") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------- entry points
def test_console_script_entry_point(capsys):
    """pyproject's `gpt2np = "gpt2np.cli:main"`: main() returns the status for sys.exit."""
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("gpt2np ")
    installed = shutil.which("gpt2np", path=str(Path(sys.executable).parent))
    if installed:
        result = subprocess.run([installed, "--version"], capture_output=True, timeout=TIMEOUT)
        assert result.returncode == 0 and result.stdout.startswith(b"gpt2np ")


def test_stream_is_the_default_only_on_a_terminal():
    terminal, pipe = types.SimpleNamespace(isatty=lambda: True), types.SimpleNamespace(isatty=lambda: False)
    assert cli.should_stream(types.SimpleNamespace(stream=None), terminal)
    assert not cli.should_stream(types.SimpleNamespace(stream=None), pipe)
    assert not cli.should_stream(types.SimpleNamespace(stream=False), terminal)
    assert cli.should_stream(types.SimpleNamespace(stream=True), pipe)


def test_stop_flag_understands_backslash_escapes():
    assert console.stop_text("\\n") == "\n"
    assert console.stop_text("a\\tb\\\\n") == "a\tb\\n"
    assert console.stop_text("\\q") == "\\q"


@pytest.mark.parametrize("text", ["日本語のテキスト" * 30, "naïve café " * 40, "one" + " word" * 200])
def test_truncation_keeps_a_suffix_of_the_prompt_that_fits(text, toy_model):
    ids = toy_model.tokenizer.encode(text)
    kept = cli.last_tokens_text(toy_model.tokenizer, ids, 10)
    assert 0 < len(toy_model.tokenizer.encode(kept)) <= 10
    assert text.endswith(kept)  # whole characters only: no U+FFFD from a cut inside one


# ---------------------------------------------------------------------------------------- threads
def test_threads_flag_runs_the_same_text(toy_folder, toy_model, monkeypatch, capsys):
    expected = toy_model.generate(PROMPT, seed=2, max_new_tokens=4) + "\n"
    for threads in ("1", "3"):
        argv = ["generate", PROMPT, "--model", str(toy_folder), "--seed", "2", "--max-new-tokens", "4"]
        assert run_in_process([*argv, "--threads", threads], monkeypatch, capsys) == (0, expected, "")


@pytest.mark.parametrize("command", ["generate", "serve", "eval", "batch"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_bad_threads_flag_is_one_line(command, value, toy_folder, monkeypatch, capsys):
    argv = [command, "--model", str(toy_folder), f"--threads={value}"]
    if command == "batch":
        argv += ["-", "--task", "score"]
    status, out, err = run_in_process(argv, monkeypatch, capsys)
    assert (status, out) == (2, "") and err.count("\n") == 1, err
    assert err.startswith(("gpt2np: error: ", f"gpt2np {command}: error: ")) and "--threads" in err, err


def test_a_bad_thread_variable_is_one_line_that_names_it(toy_folder, monkeypatch, capsys):
    monkeypatch.setenv("GPT2NP_NUM_THREADS", "all")
    argv = ["generate", PROMPT, "--model", str(toy_folder), "--max-new-tokens", "2"]
    assert_one_line_error(*run_in_process(argv, monkeypatch, capsys), "GPT2NP_NUM_THREADS='all'", "unset it")
