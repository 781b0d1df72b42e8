"""`gpt2np serve` as clients see it: the real server runs as a subprocess on a free loopback port and
every test talks HTTP to it. Answers are checked against `GPT2.generate` run here, in the test."""

import http.client
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from checkpoints import TOY  # the shared tiny checkpoint's config (tests/conftest.py)

from gpt2np import GPT2, GPT2Config
from gpt2np.checkpoint import random_state_dict, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD_BODY = {
    "input_data": ["My name is John and I am", "Once upon a time,"],
    "params": {"top_p": 1.0, "temperature": 0.8, "max_new_tokens": 100, "do_sample": True, "return_full_text": True},
}


# ---------------------------------------------------------------------------------------- helpers
class Server:
    """A `python -m gpt2np.server` subprocess; its stderr (the request log) goes to a file."""

    def __init__(self, folder: Path, log_path: Path, *flags: str, max_files: int | None = None):
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            OPENBLAS_NUM_THREADS="1",
            OMP_NUM_THREADS="1",
        )  # 2 cores: no BLAS thread fights
        self.log_path = log_path
        self._log = open(log_path, "w")
        command = [sys.executable, "-m", "gpt2np.server", "--model", str(folder), "--port", "0", *flags]
        if max_files is not None:  # as `ulimit -n` would: the server's file descriptor limit
            command = ["sh", "-c", f'ulimit -n {max_files} && exec "$@"', "sh", *command]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log, env=env, cwd=ROOT)
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout=30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"on http://127\.0\.0\.1:(\d+) ", self.log())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"the server did not start; its log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def log_when(self, predicate, timeout: float = 10.0) -> str:
        """The log once `predicate(log)` holds (or the timeout passes): the server writes a
        request's line after sending its answer, so a client can read the log too early."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if predicate(text) or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def request(self, method, path, body=b"", headers=None, timeout=60.0):
        """(status, headers, body bytes)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def score(self, body, timeout=60.0):
        """(status, parsed JSON answer) for a /score body (a dict, sent as JSON)."""
        data = json.dumps(body).encode()
        status, _, answer = self.request("POST", "/score", data, {"Content-Type": "application/json"}, timeout)
        return status, json.loads(answer)

    def health(self) -> dict:
        status, _, body = self.request("GET", "/health", timeout=10)
        assert status == 200
        return json.loads(body)

    def wait_until(self, predicate, timeout=20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if predicate(health):
                return health
            time.sleep(0.01)
        raise AssertionError(f"the server never reached the expected state; last /health: {health}")


def score_request(body: dict, expect_100=False) -> tuple[bytes, bytes]:
    """(head, body) of a POST /score request with `body` as JSON, to send on a raw socket."""
    data = json.dumps(body).encode()
    expect = "Expect: 100-continue\r\n" if expect_100 else ""
    head = (
        f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n{expect}\r\n"
    ).encode()
    return head, data


def read_response(reader) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the next answer on a socket's file: answers on one connection follow
    each other, which http.client cannot read from a raw socket without losing the next one."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip()] = value.strip()
    status = int(status_line.split()[1])
    return status, headers, b"" if status < 200 else reader.read(int(headers["Content-Length"]))


def wait_for(predicate, timeout=30.0, what="the condition"):
    """Poll `predicate()` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        time.sleep(0.02)


def checkpoint(folder: Path, config: GPT2Config) -> Path:
    save_checkpoint(folder, config, random_state_dict(config, seed=0))
    return folder


def one_blas_thread():
    """The references computed here run faster on 2 cores with one BLAS thread (when threadpoolctl is there)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1)


@pytest.fixture(scope="module")
def model(toy_model) -> GPT2:  # conftest.py's session model: the checkpoint `toy_folder` the servers load
    return toy_model


@pytest.fixture(scope="module")
def server(toy_folder, tmp_path_factory):
    server = Server(toy_folder, tmp_path_factory.mktemp("log") / "server.log", "--max-batch-size", "16")
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------- routes
def test_liveness_and_health(server, toy_folder):
    status, headers, body = server.request("GET", "/")
    assert (status, body) == (200, b"Healthy")
    health = server.health()
    assert health["queue_depth"] == 0 and health["status"] == "ok"


def test_health_shows_no_local_path_and_server_no_python_version(server, toy_folder):
    status, headers, body = server.request("GET", "/health")
    assert status == 200
    assert json.loads(body)["model"] == toy_folder.name and str(toy_folder.parent) not in body.decode()
    assert headers["Server"] == "gpt2np"


@pytest.mark.parametrize("path", ["/", "/health"])
def test_head_is_answered_like_get(server, path):
    status, headers, body = server.request("HEAD", path)
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_model_card_request(server, model):
    status, texts = server.score(MODEL_CARD_BODY)
    assert status == 200
    assert isinstance(texts, list) and len(texts) == 2
    for prompt, text in zip(MODEL_CARD_BODY["input_data"], texts):
        assert text.startswith(prompt) and len(text) > len(prompt)


def test_several_prompts_match_the_library(server, model):
    prompts = ["Hello, my dog is cute", "", "The capital of France is", "<|endoftext|>A"]
    params = {
        "max_new_tokens": 12,
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 40,
        "seed": 5,
        "return_full_text": False,
    }
    status, texts = server.score({"input_data": prompts, "params": params})
    assert status == 200
    with one_blas_thread():
        assert texts == model.generate(prompts, **params)
    assert server.score({"input_data": prompts, "params": params}) == (200, texts)  # the seed reproduces


def test_values_at_the_edge_of_float32_are_answered(server, model):
    """A repetition penalty of 1e-300 once raised an IndexError in the sampler: a 500."""
    body = {
        "input_data": ["Hello"],
        "params": {"repetition_penalty": 1e-300, "temperature": 1e-300, "seed": 1, "max_new_tokens": 5},
    }
    status, texts = server.score(body)
    with one_blas_thread():
        assert (status, texts) == (200, model.generate(body["input_data"], **body["params"]))


def test_unknown_route_and_method(server):
    status, _, body = server.request("GET", "/nowhere")
    assert status == 404 and "POST /score" in json.loads(body)["error"]
    status, headers, _ = server.request("GET", "/score")
    assert status == 405 and headers["Allow"] == "POST"


# ---------------------------------------------------------------------------------------- validation
JSON = {"Content-Type": "application/json"}
BAD_BODIES = {
    # name: (body, the words the error must contain)
    "empty body": (b"", "empty"),
    "malformed JSON": (b'{"input_data": ["a"', "not valid JSON"),
    "NaN is not JSON": (b'{"input_data": ["a"], "params": {"temperature": NaN}}', "NaN"),
    "not UTF-8": (b'{"input_data": ["\xff"]}', "UTF-8"),
    "body is a list": (b'["a prompt"]', "JSON object"),
    "missing input_data": (b'{"params": {}}', "input_data"),
    "unknown top-level field": (b'{"input_data": ["a"], "parameters": {}}', "parameters"),
    "input_data a string": (b'{"input_data": "a prompt"}', "input_data"),
    "input_data empty": (b'{"input_data": []}', "input_data"),
    "input_data not strings": (b'{"input_data": ["a", 3]}', "input_data[1]"),
    "params not an object": (b'{"input_data": ["a"], "params": [1]}', "params"),
    "unknown param": (b'{"input_data": ["a"], "params": {"top_q": 1}}', "top_q"),
    "top_p zero": (b'{"input_data": ["a"], "params": {"top_p": 0}}', "top_p"),
    "top_p above one": (b'{"input_data": ["a"], "params": {"top_p": 1.5}}', "top_p"),
    "temperature zero while sampling": (b'{"input_data": ["a"], "params": {"temperature": 0}}', "temperature"),
    "max_new_tokens zero": (b'{"input_data": ["a"], "params": {"max_new_tokens": 0}}', "max_new_tokens"),
    "max_new_tokens past the context": (b'{"input_data": ["a"], "params": {"max_new_tokens": 128}}', "max_new_tokens"),
    "true is not a number": (b'{"input_data": ["a"], "params": {"max_new_tokens": true}}', "max_new_tokens"),
    "string is not a number": (b'{"input_data": ["a"], "params": {"temperature": "0.8"}}', "temperature"),
    "do_sample not a boolean": (b'{"input_data": ["a"], "params": {"do_sample": 1}}', "do_sample"),
    "return_full_text not a boolean": (
        b'{"input_data": ["a"], "params": {"return_full_text": "yes"}}',
        "return_full_text",
    ),
    "negative seed": (b'{"input_data": ["a"], "params": {"seed": -1}}', "seed"),
    "top_k zero": (b'{"input_data": ["a"], "params": {"top_k": 0}}', "top_k"),
    "stop not strings": (b'{"input_data": ["a"], "params": {"stop": [1]}}', "stop"),
    "prompt fills the context": (json.dumps({"input_data": [" a" * 200]}).encode(), "input_data[0]"),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_body_is_400_naming_the_field(server, case):
    body, words = BAD_BODIES[case]
    status, headers, answer = server.request("POST", "/score", body, JSON)
    assert status == 400, answer
    assert headers["Content-Type"] == "application/json"
    assert words in json.loads(answer)["error"]


def test_max_new_tokens_cap_counts_the_longest_prompt(server, model):
    prompt = " a" * 20
    room = TOY.n_ctx - len(model.tokenizer.encode(prompt))
    status, answer = server.score({"input_data": ["x", prompt], "params": {"max_new_tokens": room + 1}})
    assert status == 400 and f"lower params.max_new_tokens to {room}" in answer["error"]
    assert "input_data[1]" in answer["error"]
    assert server.score({"input_data": ["x", prompt], "params": {"max_new_tokens": room, "do_sample": False}})[0] == 200


def test_max_new_tokens_cap_is_named_when_it_is_the_tighter_limit():
    from gpt2np.httperrors import HTTPError
    from gpt2np.modelcard import check_lengths
    from gpt2np.request import parse_request

    request = parse_request('{"input_data": ["a", "b"], "params": {"max_new_tokens": 50}}')
    ids = [[1], [1] * 20]
    cap = r"params.max_new_tokens must be at most 30 here \(this server's --max-new-tokens-cap\), got 50"
    with pytest.raises(HTTPError, match=cap):
        check_lengths(request, ids, 128, cap=30)
    context = r"input_data\[1\] is 20 tokens and params.max_new_tokens is 50, .* lower params.max_new_tokens to 8$"
    with pytest.raises(HTTPError, match=context):  # the context leaves 8 tokens, fewer than the cap
        check_lengths(request, ids, 28, cap=40)
    check_lengths(request, ids, 128, cap=50)


def test_azure_ml_shape(server, model):
    """{"input_data": {"input_string": [...], "parameters": {...}}} is the same request as the flat shape."""
    prompts, params = ["Hello there", "Once"], {"max_new_tokens": 6, "do_sample": False, "return_full_text": False}
    status, texts = server.score({"input_data": {"input_string": prompts, "parameters": params}})
    assert status == 200
    with one_blas_thread():
        assert texts == model.generate(prompts, **params)
    status, answer = server.score({"input_data": {"input_string": prompts, "parameters": {"top_p": 2}}})
    assert status == 400 and answer["error"].startswith("input_data.parameters.top_p must be in (0, 1]")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_415(server, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    status, _, answer = server.request("POST", "/score", b'{"input_data": ["a"]}', headers)
    assert status == 415 and "application/json" in json.loads(answer)["error"]


@pytest.mark.parametrize("expect_100", [False, True])
def test_body_over_the_limit_is_413_before_it_is_sent(server, expect_100):
    """The client announces 2 MB and sends none of it: the answer must come anyway."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        expect = "Expect: 100-continue\r\n" if expect_100 else ""
        sock.sendall(
            f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 2000000\r\n{expect}\r\n".encode()
        )
        answer = sock.makefile("rb").read()  # the server closes the connection after answering
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"--max-body-bytes" in answer


def test_expect_100_continue_then_the_answer(server, model):
    """A client that waits for 100 Continue before sending its body gets it, then its answer."""
    params = {"do_sample": False, "max_new_tokens": 8}
    head, data = score_request({"input_data": ["Hello there"], "params": params}, expect_100=True)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        reader = sock.makefile("rb")
        sock.sendall(head)
        assert reader.readline() == b"HTTP/1.1 100 Continue\r\n" and reader.readline() == b"\r\n"
        sock.sendall(data)
        status, _, answer = read_response(reader)
    assert status == 200
    with one_blas_thread():
        assert json.loads(answer) == model.generate(["Hello there"], **params)


# ---------------------------------------------------------------------------------------- batching
def test_sixteen_concurrent_clients_with_mixed_params(server, model):
    greedy = {"input_data": ["The meaning of life is"], "params": {"do_sample": False, "max_new_tokens": 30}}
    status, alone = server.score(greedy)  # with no other traffic
    assert status == 200
    with one_blas_thread():
        stop_word = model.generate("In the beginning", do_sample=False, max_new_tokens=10, return_full_text=False)
        stop_word = stop_word.split()[len(stop_word.split()) // 2]  # a word this greedy text does reach
        kinds = [
            {"do_sample": False, "max_new_tokens": 30},
            {"do_sample": True, "temperature": 0.8, "max_new_tokens": 25, "seed": 1},
            {"do_sample": True, "temperature": 1.2, "top_k": 20, "top_p": 0.9, "max_new_tokens": 20, "seed": 2},
            {"do_sample": False, "repetition_penalty": 1.3, "max_new_tokens": 15, "return_full_text": False},
            {"do_sample": False, "max_new_tokens": 10, "stop": [stop_word], "return_full_text": False},
            {"do_sample": True, "max_new_tokens": 18, "seed": 3, "ignore_eos": True},
            {"do_sample": False, "max_new_tokens": 5},
            {"do_sample": True, "temperature": 0.5, "max_new_tokens": 22, "seed": 4},
        ]
        bodies = [greedy]
        for i in range(15):
            prompts = [f"Request {i} says"] + [f"and {j} more" for j in range(i % 3)]
            if i % 8 == 4:
                prompts = ["In the beginning"]  # the prompt whose greedy text holds the stop word
            bodies.append({"input_data": prompts, "params": kinds[i % len(kinds)]})
        expected = [model.generate(b["input_data"], **b["params"]) for b in bodies]
    assert expected[0] == alone  # the server alone answers what the library does

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(server.score, bodies))
    assert [status for status, _ in answers] == [200] * 16
    for body, (_, texts), want in zip(bodies, answers, expected):
        assert texts == want, body
    assert answers[0][1] == alone  # greedy: the same bytes with and without concurrent traffic
    log = server.log_when(lambda text: text.count(" POST /score 200 ") >= 17)
    lines = [line for line in log.splitlines() if " POST /score 200 " in line]
    assert len(lines) >= 17 and re.search(r"prompts=\d+ new_tokens=\d+ \d+\.\d{3}s$", lines[-1])


def test_rows_joining_and_leaving_mid_decoding_match_the_library(model):
    """The scheduler's step, in process: rows join while others decode (with longer and shorter
    histories, so the cache widens and pads) and leave at different steps."""
    from gpt2np.generation import prepare_prompts
    from gpt2np.modelcard import CardJob
    from gpt2np.sampling import GenerationOptions
    from gpt2np.scheduler import Scheduler

    cases = [  # (step at which it joins, prompt, options, seed)
        (0, "A short one", GenerationOptions(max_new_tokens=12, do_sample=False, ignore_eos=True), None),
        (
            3,
            "A much longer prompt, with many more tokens than the first",
            GenerationOptions(max_new_tokens=6, do_sample=False),
            None,
        ),
        (3, "", GenerationOptions(max_new_tokens=9, temperature=0.9, top_k=50, ignore_eos=True), 7),
        (
            5,
            "Late",
            GenerationOptions(max_new_tokens=4, do_sample=False, repetition_penalty=1.5, ignore_eos=True),
            None,
        ),
    ]
    jobs = [
        CardJob([p], prepare_prompts(model.tokenizer, [p], bos=50256), o, seed, False, model) for _, p, o, seed in cases
    ]
    scheduler = Scheduler(model, max_batch_size=16, max_queue=4)  # not started: this test is its worker
    with one_blas_thread():
        for step in range(20):
            for (joins, *_), job in zip(cases, jobs):
                if joins == step:
                    scheduler.engine.add(job.rows)
            if scheduler.engine.rows:
                scheduler.step()
        assert not scheduler.engine.rows and all(job.closed for job in jobs)
        for (_, prompt, o, seed), job in zip(cases, jobs):
            expected = model.generate(
                prompt,
                max_new_tokens=o.max_new_tokens,
                do_sample=o.do_sample,
                temperature=o.temperature,
                top_k=o.top_k,
                repetition_penalty=o.repetition_penalty,
                ignore_eos=o.ignore_eos,
                seed=seed,
                return_full_text=False,
            )
            assert job.texts == [expected], prompt


def test_leaving_rows_lay_out_their_cache_columns(model):
    """Rows that leave make the engine copy the kept rows' used columns, in order, right-aligned at
    `end`, with room for the tokens still to come; every copied column is finite (prefill writes
    them all, padding columns stay zeros)."""
    from gpt2np.engine import Engine
    from gpt2np.generation import prepare_prompts
    from gpt2np.modelcard import CardJob
    from gpt2np.sampling import GenerationOptions

    prompts = ["One", "A longer prompt than the first", "Mid length one", "x"]
    o = GenerationOptions(max_new_tokens=5, do_sample=False, ignore_eos=True)
    job = CardJob(prompts, prepare_prompts(model.tokenizer, prompts, bos=50256), o, None, False, model)
    engine = Engine(model)
    engine.add(job.rows)
    engine.choose()
    engine.forward()
    before, end = engine.state, engine.end
    keep = [0, 2, 3]  # not contiguous, and without the longest row: the layout narrows
    for i, row in enumerate(engine.rows):
        if i not in keep:
            row.finish()
    engine.choose()
    engine.forward()  # lays out the kept rows, then writes their tokens at the new `end`
    after = engine.state
    lead = int(np.argmax(before.valid[keep, :end].any(axis=0)))
    w = end - lead
    assert engine.end == w + 1 and [r.ids for r in after.rows] == [before.rows[i].ids for i in keep]
    np.testing.assert_array_equal(after.cache[:, :, :, :, :w], before.cache[:, :, keep, :, lead:end])
    np.testing.assert_array_equal(after.valid[:, :w], before.valid[keep, lead:end])
    assert np.isfinite(after.cache[:, :, :, :, :w]).all()  # padding too: masked weights are zeros, 0 * NaN is not
    assert after.valid.shape[1] >= w + o.max_new_tokens - 2  # room for the tokens still to come


# ---------------------------------------------------------------------------------------- limits and failures
@pytest.fixture(scope="module")
def one_row_server(tmp_path_factory):
    """One row at a time, one waiting request, a 1 s timeout; a context of 256 for long requests."""
    folder = checkpoint(tmp_path_factory.mktemp("one-row"), GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=256))
    server = Server(
        folder,
        tmp_path_factory.mktemp("log") / "server.log",
        "--max-batch-size",
        "1",
        "--max-queue",
        "1",
        "--timeout",
        "1",
    )
    yield server
    server.stop()


def test_internal_failure_is_500_and_the_server_goes_on(model, monkeypatch):
    """In process, with a failure planted in the engine for one prompt: its request gets a 500 that
    names only the error's type, the log has the details, and the server goes on serving."""
    from gpt2np import engine
    from gpt2np.httpd import ModelServer

    planted = model.tokenizer.encode("Hello world")
    real_add = engine.Engine.add

    def add(self, rows):
        if any(row.ids == planted for row in rows):
            raise IndexError("a planted failure")
        return real_add(self, rows)

    monkeypatch.setattr(engine.Engine, "add", add)
    log = io.StringIO()
    server = ModelServer(("127.0.0.1", 0), model, model_name="tiny", log=log)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:

        def post(body):
            connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            connection.request("POST", "/score", json.dumps(body), JSON)
            response = connection.getresponse()
            answer = (response.status, json.loads(response.read()))
            connection.close()
            return answer

        status, answer = post({"input_data": ["Hello world"], "params": {"max_new_tokens": 3}})
        assert status == 500 and "internal error (IndexError)" in answer["error"] and "planted" not in answer["error"]
        wait_for(lambda: "a planted failure" in log.getvalue(), what="the error in the log")
        assert post({"input_data": ["!"], "params": {"do_sample": False, "max_new_tokens": 3}})[0] == 200
    finally:
        server.stop_gracefully()


def test_full_queue_is_503_and_slow_request_is_504(one_row_server):
    # 64 rows of 250 tokens, one row at a time: far longer than the 1 s timeout. While its rows
    # wait their turn, the job holds the one place in the queue.
    slow = {"input_data": ["!"] * 64, "params": {"do_sample": False, "max_new_tokens": 250, "ignore_eos": True}}
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow_answer = pool.submit(one_row_server.score, slow)
        one_row_server.wait_until(lambda h: h["queue_depth"] == 1 and h["batch_rows"] == 1)
        status, headers, body = one_row_server.request("POST", "/score", b'{"input_data": ["!"]}', JSON)
        assert status == 503 and headers["Retry-After"] == "1" and "queue" in json.loads(body)["error"]
        status, answer = slow_answer.result(timeout=30)
    assert status == 504 and "--timeout" in answer["error"]
    one_row_server.wait_until(lambda h: h["queue_depth"] == 0 and h["batch_rows"] == 0)  # its rows were dropped
    assert one_row_server.score({"input_data": ["!"], "params": {"max_new_tokens": 2}})[0] == 200


# ---------------------------------------------------------------------------------------- shutdown
def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(tmp_path):
    folder = checkpoint(tmp_path / "long", GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=1024))
    server = Server(folder, tmp_path / "server.log")
    try:
        params = {"do_sample": False, "max_new_tokens": 1000, "ignore_eos": True}
        body = {"input_data": ["Once", "Twice"], "params": params}
        result = {}
        client = threading.Thread(target=lambda: result.update(answer=server.score(body)))
        client.start()
        server.wait_until(lambda h: h["batch_rows"] == 2)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # soon, new connections are refused while the request above still decodes
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            except (ConnectionRefusedError, ConnectionResetError):
                break
            assert time.monotonic() < deadline, "the server still accepts connections 10 s after SIGTERM"
            time.sleep(0.05)
        assert server.proc.wait(timeout=40) == 0
        client.join(timeout=10)
        status, texts = result["answer"]
        assert status == 200 and [len(t) > 1000 for t in texts] == [True, True]
        assert "stopped" in server.log().splitlines()[-1]
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------- clients that leave
LONG = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=1024)
CLOSED_LINE = re.compile(
    r" POST /score 499 prompts=(\d+) new_tokens=(\d+) \d+\.\d{3}s "
    r"error=the client closed the connection$"
)


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory) -> Path:
    """A context of 1024 tokens: room for requests that decode for many seconds."""
    return checkpoint(tmp_path_factory.mktemp("long"), LONG)


@pytest.fixture(scope="module")
def long_model(long_folder) -> GPT2:
    return GPT2.from_pretrained(long_folder)


@pytest.fixture(scope="module")
def long_server(long_folder, tmp_path_factory):
    server = Server(long_folder, tmp_path_factory.mktemp("log") / "server.log", "--max-batch-size", "2")
    yield server
    server.stop()


def closed_lines(log: str) -> list[re.Match]:
    return [m for m in map(CLOSED_LINE.search, log.splitlines()) if m]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_that_leaves_is_logged_499_and_its_prompts_leave_the_batch(long_server, long_model, how):
    # 64 prompts of 1000 tokens, two at a time: 32,000 steps, far more than this test waits for.
    n_prompts, n_tokens = 64, 1000
    params = {"do_sample": False, "max_new_tokens": n_tokens, "ignore_eos": True}
    head, data = score_request({"input_data": ["Once"] * n_prompts, "params": params})
    before = len(closed_lines(long_server.log()))
    sock = socket.create_connection(("127.0.0.1", long_server.port), timeout=30)
    try:
        sock.sendall(head + data)
        long_server.wait_until(lambda h: h["batch_rows"] == 2 and h["queue_depth"] == 1)  # decoding
        if how == "reset":  # an RST instead of a FIN: the server's recv fails instead of reading the end
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()  # without reading anything
    log = long_server.log_when(lambda text: len(closed_lines(text)) > before, timeout=30)
    lines = closed_lines(log)
    assert len(lines) == before + 1, f"no 499 line for the client that left; the log:\n{log}"
    prompts, new_tokens = map(int, lines[-1].groups())
    assert prompts == n_prompts and new_tokens < n_prompts * n_tokens // 4  # noticed early, not at the end
    # Its rows leave the batch at the next step and the rows still waiting are never admitted.
    long_server.wait_until(lambda h: h["batch_rows"] == 0 and h["queue_depth"] == 0)
    greedy = {"do_sample": False, "max_new_tokens": 20}
    status, texts = long_server.score({"input_data": ["The next client"], "params": greedy})
    with one_blas_thread():
        assert (status, texts) == (200, long_model.generate(["The next client"], **greedy))


def test_pipelined_request_is_not_taken_for_a_disconnect(long_server, long_model):
    """A client on a kept-alive connection sends its next request while the first decodes: the
    bytes waiting on the socket must not end the first, and both are answered in order."""
    first = {"input_data": ["Once"], "params": {"do_sample": False, "max_new_tokens": 1000, "ignore_eos": True}}
    second = {"input_data": ["Then"], "params": {"do_sample": False, "max_new_tokens": 10}}
    before = long_server.log()
    with socket.create_connection(("127.0.0.1", long_server.port), timeout=60) as sock:
        reader = sock.makefile("rb")
        sock.sendall(b"".join(score_request(first)))
        long_server.wait_until(lambda h: h["batch_rows"] == 1)  # the first body is read: the next bytes wait
        sock.sendall(b"".join(score_request(second)))
        answers = [read_response(reader), read_response(reader)]
    with one_blas_thread():
        expected = [long_model.generate(body["input_data"], **body["params"]) for body in (first, second)]
    assert [(status, json.loads(body)) for status, _, body in answers] == [(200, want) for want in expected]
    log = long_server.log_when(lambda text: text.count(" POST /score 200 ") >= before.count(" POST /score 200 ") + 2)
    assert log.count(" POST /score 200 ") >= before.count(" POST /score 200 ") + 2
    assert len(closed_lines(log)) == len(closed_lines(before))  # no 499 on the way


def test_graceful_stop_after_a_client_left(long_model):
    """In process, to look inside: the job of a client that left stops decoding for good, nothing
    stays in flight, and a graceful stop does not wait for the prompts that were dropped."""
    from gpt2np.httpd import ModelServer
    from gpt2np.httperrors import http_error

    log = io.StringIO()
    server = ModelServer(("127.0.0.1", 0), long_model, model_name="long", max_batch_size=2, log=log)
    jobs, submit = [], server.scheduler.submit
    server.scheduler.submit = lambda job: (jobs.append(job), submit(job))[1]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        n_prompts, n_tokens = 8, 1000
        params = {"do_sample": False, "max_new_tokens": n_tokens, "ignore_eos": True}
        with socket.create_connection(server.server_address[:2], timeout=30) as sock:
            sock.sendall(b"".join(score_request({"input_data": ["Once"] * n_prompts, "params": params})))
            wait_for(lambda: server.scheduler.depth() == (1, 2), what="decoding the first two prompts")
        wait_for(lambda: CLOSED_LINE.search(log.getvalue()), what="the 499 log line")
        wait_for(lambda: server.scheduler.depth() == (0, 0), what="an empty batch and queue")
        wait_for(lambda: server._inflight == 0, what="no request in flight")
        (job,) = jobs
        assert http_error(job.error).status == 499 and job.texts is None
        dropped_at = job.new_tokens
        assert dropped_at < n_prompts * n_tokens
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        body = json.dumps({"input_data": ["Next"], "params": {"do_sample": False, "max_new_tokens": 5}})
        connection.request("POST", "/score", body, JSON)
        assert connection.getresponse().status == 200
        connection.close()
        assert job.new_tokens == dropped_at  # the worker decoded after, without its rows
    finally:
        stopper = threading.Thread(target=server.stop_gracefully, daemon=True)
        stopper.start()
        stopper.join(timeout=30)
    assert not stopper.is_alive(), "the graceful stop is still waiting"
    assert server._inflight == 0 and log.getvalue().count(" 499 ") == 1


# ---------------------------------------------------------------------------------------- hostile clients
def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes and read until the server closes the connection (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return sock.makefile("rb").read()


def test_utf8_byte_order_mark_is_accepted(server, model):
    body = {"input_data": ["Hello"], "params": {"do_sample": False, "max_new_tokens": 3}}
    status, _, answer = server.request("POST", "/score", b"\xef\xbb\xbf" + json.dumps(body).encode(), JSON)
    with one_blas_thread():
        assert (status, json.loads(answer)) == (200, model.generate(["Hello"], **body["params"]))


def test_post_without_content_length_is_411(server):
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(server.port, head)
    assert answer.startswith(b"HTTP/1.1 411 ") and b"Content-Length" in answer


def test_content_length_headers_that_disagree_are_400(server):
    """Behind a proxy that reads the other one, the first winning would let a request smuggle another."""
    data = json.dumps({"input_data": ["a"], "params": {"max_new_tokens": 1}}).encode()
    head = (
        f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        f"Content-Length: {len(data) + 40}\r\n\r\n"
    ).encode()
    answer = raw_exchange(server.port, head + data)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Content-Length" in answer


def test_deeply_nested_json_is_400(server):
    status, _, answer = server.request("POST", "/score", b"[" * 100_000 + b"]" * 100_000, JSON)
    assert status == 400 and "nested too deeply" in json.loads(answer)["error"]


@pytest.mark.parametrize("prompt", ['"a\\udcff"', '"\\ud800 b"'])
def test_lone_surrogate_is_400_before_generating(server, prompt):
    before = server.log().count(" 500 ")
    body = b'{"input_data": [' + prompt.encode() + b'], "params": {"max_new_tokens": 5}}'
    status, _, answer = server.request("POST", "/score", body, JSON)
    error = json.loads(answer)["error"]
    assert status == 400 and "input_data[0]" in error and "surrogate" in error
    log = server.log_when(lambda text: " 400 prompts=0 new_tokens=0 " in text)
    assert log.count(" 500 ") == before


def test_control_characters_in_a_path_are_escaped_in_the_log(server):
    answer = raw_exchange(server.port, b"GET /\x1b[31mred\x07 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ")
    log = server.log_when(lambda text: "red\\x07" in text)
    assert "/\\x1b[31mred\\x07 404" in log and "\x1b" not in log and "\x07" not in log


def test_oversized_body_shows_its_413_to_a_client_still_sending_it(server):
    """http.client sends the whole body before reading: the server must not reset the connection under it."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", "/score", b" " * 3_000_000, JSON)
        response = connection.getresponse()
        assert response.status == 413 and "--max-body-bytes" in json.loads(response.read())["error"]
    finally:
        connection.close()


def test_a_client_that_half_closes_after_its_request_gets_its_answer(long_server, long_model):
    """shutdown(SHUT_WR) after a complete request is not a disconnect (it was taken for one after 0.2 s)."""
    params = {"do_sample": False, "max_new_tokens": 1000, "ignore_eos": True}  # a second or more: polled often
    before = len(closed_lines(long_server.log()))
    with socket.create_connection(("127.0.0.1", long_server.port), timeout=60) as sock:
        sock.sendall(b"".join(score_request({"input_data": ["Half"], "params": params})))
        sock.shutdown(socket.SHUT_WR)
        reader = sock.makefile("rb")
        status, _, answer = read_response(reader)
        while status == 100:  # an interim answer may come first (the server's check that the client is there)
            status, _, answer = read_response(reader)
    with one_blas_thread():
        assert (status, json.loads(answer)) == (200, long_model.generate(["Half"], **params))
    assert len(closed_lines(long_server.log())) == before


@pytest.fixture(scope="module")
def strict_server(toy_folder, tmp_path_factory):
    """Short read deadline, few connections, few prompts, a small prefill chunk."""
    server = Server(
        toy_folder,
        tmp_path_factory.mktemp("log") / "server.log",
        "--read-timeout",
        "1",
        "--max-connections",
        "4",
        "--max-prompts",
        "8",
        "--prefill-chunk",
        "16",
    )
    yield server
    server.stop()


def test_client_stalled_mid_body_gets_408(strict_server):
    head, data = score_request({"input_data": ["a"]})
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=5) as sock:
        sock.sendall(head + data[:5])
        start = time.monotonic()
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"--read-timeout" in answer
    assert time.monotonic() - start < 3


def test_client_trickling_a_byte_at_a_time_is_cut_off(strict_server):
    """Every byte arrives well within a recv timeout; the whole request does not within --read-timeout."""
    head, data = score_request({"input_data": ["a"]})
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=5) as sock:
        start = time.monotonic()
        try:
            for byte in head + data:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                assert time.monotonic() - start < 4, "still connected after 4 s"
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off while sending: what this test wants
        else:
            raise AssertionError("the whole request was taken, one byte at a time")


def test_connections_past_the_cap_get_503_at_once(strict_server):
    """Four connections in the middle of a request (none idle to close): the fifth is refused at once."""
    idle = [socket.create_connection(("127.0.0.1", strict_server.port), timeout=5) for _ in range(4)]
    try:
        for sock in idle:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", strict_server.port), timeout=2) as sock:
            answer = sock.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"--max-connections" in answer
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: strict_server.request("GET", "/", timeout=5)[0] == 200, timeout=10, what="room again")


def test_idle_connections_make_room_for_a_request(strict_server, model):
    """At the cap, the connection idle the longest is closed (as nginx does) instead of refusing the new one."""
    idle = [socket.create_connection(("127.0.0.1", strict_server.port), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.2)
        assert strict_server.request("GET", "/", timeout=5)[0] == 200
        assert idle[0].recv(1) == b""  # the oldest was closed
    finally:
        for sock in idle:
            sock.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_idle_connections_under_a_low_descriptor_limit(toy_folder, tmp_path):
    """ulimit -n 128 and 200 idle connections: the server neither spins on a failing accept() nor
    leaves a normal request unanswered."""
    server = Server(toy_folder, tmp_path / "server.log", max_files=128)
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(200)]
        time.sleep(0.5)
        before = cpu_seconds(server.proc.pid)
        time.sleep(1.0)
        spent = cpu_seconds(server.proc.pid) - before
        assert server.request("GET", "/health", timeout=5)[0] == 200
        assert spent < 0.5, f"the idle server used {spent:.2f} s of CPU in 1 s"
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_too_many_prompts_is_400_naming_the_limit(strict_server):
    status, answer = strict_server.score({"input_data": ["a"] * 9, "params": {"max_new_tokens": 1}})
    assert status == 400 and "--max-prompts" in answer["error"]
    assert strict_server.score({"input_data": ["a"] * 8, "params": {"max_new_tokens": 1}})[0] == 200


def test_seeded_answer_says_whether_it_shared_its_batch(strict_server, model):
    """X-Shared-Batch: false means every step ran this request's rows only: the same request alone gives
    the same bytes again. true: other rows shared some steps, which float32 rounding may feel."""
    body = {"input_data": ["Seeded"], "params": {"seed": 3, "max_new_tokens": 20, "ignore_eos": True}}
    data = json.dumps(body).encode()
    status, headers, alone = strict_server.request("POST", "/score", data, JSON)
    assert status == 200 and headers["X-Shared-Batch"] == "false"
    with one_blas_thread():
        assert json.loads(alone) == model.generate(body["input_data"], **body["params"])
    long = {"input_data": ["Long"], "params": {"max_new_tokens": 100, "ignore_eos": True}}
    with ThreadPoolExecutor(max_workers=1) as pool:
        other = pool.submit(strict_server.score, long)
        strict_server.wait_until(lambda h: h["batch_rows"] == 1)
        status, headers, _ = strict_server.request("POST", "/score", data, JSON)
        assert other.result(timeout=30)[0] == 200
    assert status == 200 and headers["X-Shared-Batch"] == "true"


def in_process_server(model, log: io.StringIO, **kwargs):
    """A ModelServer in this process on a free port, serving in a thread."""
    from gpt2np.httpd import ModelServer

    server = ModelServer(("127.0.0.1", 0), model, model_name="tiny", log=log, **kwargs)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def post(server, body: bytes, timeout: float = 60):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    try:
        connection.request("POST", "/score", body, JSON)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_prompt_too_long_in_bytes_is_refused_before_tokenizing(model, monkeypatch):
    calls = []
    real_encode = model.tokenizer.encode
    monkeypatch.setattr(model.tokenizer, "encode", lambda *a, **k: (calls.append(1), real_encode(*a, **k))[1])
    server = in_process_server(model, io.StringIO())
    try:
        status, answer = post(server, json.dumps({"input_data": ["x" * 300_000]}).encode())
        assert status == 400 and "bytes" in answer["error"] and "input_data[0]" in answer["error"]
        assert calls == []
    finally:
        server.stop_gracefully()


def test_one_handler_tokenizes_at_a_time(model, monkeypatch):
    """Tokenizing is pure Python: four handlers at it at once starved the worker of the GIL."""
    active, most = [0], [0]
    lock = threading.Lock()
    real_encode = model.tokenizer.encode

    def encode(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(model.tokenizer, "encode", encode)
    server = in_process_server(model, io.StringIO())
    try:
        body = json.dumps({"input_data": ["a b c"], "params": {"max_new_tokens": 1}}).encode()
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert [a[0] for a in pool.map(lambda _: post(server, body), range(4))] == [200] * 4
        assert most[0] == 1
    finally:
        server.stop_gracefully()


def test_word_cache_stays_bounded_under_giant_words(model):
    """Rejected requests full of distinct giant words must not grow the tokenizer's cache."""
    from gpt2np import tokenizer as tokenizer_module

    server = in_process_server(model, io.StringIO())
    try:
        for i in range(20):
            word = f"{i:04d}" + "z" * 9_000
            assert post(server, json.dumps({"input_data": [word]}).encode())[0] == 400
        cache = model.tokenizer._cache
        assert model.tokenizer._cache_bytes <= tokenizer_module._CACHE_BYTES
        assert max(map(len, cache), default=0) <= tokenizer_module._CACHE_WORD_BYTES
    finally:
        server.stop_gracefully()


def test_accept_loop_does_not_spin_when_out_of_descriptors(model):
    """accept() failing with EMFILE leaves the listening socket readable: the loop must pause."""
    import errno

    server = in_process_server(model, io.StringIO())
    calls = []

    class Exhausted:
        def __init__(self, real):
            self.real = real

        def accept(self):
            calls.append(1)
            raise OSError(errno.EMFILE, "Too many open files")

        def __getattr__(self, name):
            return getattr(self.real, name)

    real = server.socket
    try:
        server.socket = Exhausted(real)
        pending = socket.create_connection(server.server_address[:2], timeout=5)  # never accepted: readable
        time.sleep(1.0)
        server.socket = real
        assert len(calls) <= 20, f"{len(calls)} accept() calls in 1 s"
        pending.close()
    finally:
        server.socket = real
        server.stop_gracefully()


def test_numpy_warnings_become_one_log_line(model, monkeypatch, capfd):
    """A warning raised while decoding is one line of the server's log, and nothing on stderr."""
    import warnings

    from gpt2np.scheduler import Scheduler

    real_step = Scheduler.step

    def step(self):
        np.float32(3e38) * np.float32(10)  # NumPy's overflow RuntimeWarning, if floating-point warnings are on
        warnings.warn("a planted warning\nin two lines", UserWarning)
        return real_step(self)

    monkeypatch.setattr(Scheduler, "step", step)
    log = io.StringIO()
    server = in_process_server(model, log)
    previous = warnings.showwarning
    try:
        server.log_warnings()
        body = json.dumps({"input_data": ["a"], "params": {"max_new_tokens": 2}}).encode()
        assert post(server, body)[0] == 200
    finally:
        warnings.showwarning = previous
        server.stop_gracefully()
    assert capfd.readouterr().err == ""
    lines = [line for line in log.getvalue().splitlines() if "warning" in line]
    assert lines and all("a planted warning\\x0ain two lines" in line for line in lines)
    assert "overflow" not in log.getvalue()


# ---------------------------------------------------------------------------------------- scheduling
def test_a_request_with_many_prompts_does_not_hold_the_batch(model):
    """In process: a job with far more prompts than the batch leaves room; a later one-prompt job
    joins at the next step instead of waiting for the first job's rows to finish."""
    from gpt2np.generation import prepare_prompts
    from gpt2np.modelcard import CardJob
    from gpt2np.sampling import GenerationOptions
    from gpt2np.scheduler import Scheduler

    o = GenerationOptions(max_new_tokens=50, do_sample=False, ignore_eos=True)
    big = CardJob(["x"] * 100, prepare_prompts(model.tokenizer, ["x"] * 100, bos=50256), o, None, False, model)
    small = CardJob(["y"], prepare_prompts(model.tokenizer, ["y"], bos=50256), o, None, False, model)
    scheduler = Scheduler(model, max_batch_size=4, max_queue=4)  # not started: this test is its worker
    scheduler.submit(big)
    with one_blas_thread():
        scheduler._join(scheduler._admit())
        scheduler.step()
        scheduler.submit(small)
        scheduler._join(scheduler._admit())
    assert small.rows[0] in scheduler.engine.rows


def test_a_long_prompt_is_prefilled_between_decoding_steps(model):
    """In process: while a long prompt is prefilled a chunk per step, the rows already decoding
    get a token at every step, and both answers are the library's."""
    from gpt2np.generation import prepare_prompts
    from gpt2np.modelcard import CardJob
    from gpt2np.sampling import GenerationOptions
    from gpt2np.scheduler import Scheduler

    o = GenerationOptions(max_new_tokens=20, do_sample=False, ignore_eos=True)
    short, long = "Short", " a" * 100
    first = CardJob([short], prepare_prompts(model.tokenizer, [short], bos=50256), o, None, False, model)
    second = CardJob([long], prepare_prompts(model.tokenizer, [long], bos=50256), o, None, False, model)
    scheduler = Scheduler(model, max_batch_size=4, max_queue=4, prefill_chunk=16)
    with one_blas_thread():
        scheduler.submit(first)
        scheduler._join(scheduler._admit())
        scheduler.step()
        scheduler.submit(second)
        scheduler._join(scheduler._admit())
        steps = 0
        while scheduler.engine.waiting:
            n = first.rows[0].n_new
            scheduler.step()
            assert first.rows[0].n_new == n + 1  # the short row decodes during the long one's prefill
            steps += 1
        assert steps == -(-100 // 16)
        while scheduler.engine.busy:
            scheduler.step()
        for job, prompt in ((first, short), (second, long)):
            assert job.texts == [
                model.generate(prompt, max_new_tokens=20, do_sample=False, ignore_eos=True, return_full_text=False)
            ]


def test_a_half_closed_streaming_client_gets_a_clean_stream(long_server, long_folder):
    """Once an answer has begun (server-sent events), no interim 100 Continue may be written into it:
    a client that half-closes gets the stream alone, to its end."""
    body = json.dumps(
        {"model": long_folder.name, "prompt": "Half", "max_tokens": 600, "temperature": 0, "stream": True}
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", long_server.port), timeout=60) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1
    assert answer.rstrip().endswith(b"data: [DONE]")
