"""Every number a client sends that reaches int() or float(): both APIs' bodies, the headers, the
request line and the query string. Each is a 4xx naming what to change, never a 500.

Python refuses to convert a string of more than 4,300 digits to an int (a ValueError raised inside
int(), json.loads included), and a float() of an int too large for a double raises OverflowError:
both once reached the client as 500s."""

import json
import socket
import threading

import pytest
from test_server import in_process_server, one_blas_thread, raw_exchange

from gpt2np import cli
from gpt2np.routes import App, Call

DIGITS_5000 = "9" * 5000  # past Python's 4,300-digit limit
DIGITS_4000 = "9" * 4000  # within it, but far too large for a float


@pytest.fixture(scope="module")
def app(toy_model):
    app = App(toy_model, "toy", max_batch_size=4)
    app.start()
    yield app
    app.scheduler.close()


def serve(app, path: str, body: str):
    name, _ = app.route("POST", path)
    answer = app.serve(name, Call("POST", path, body=body.encode()))
    return answer.status, json.loads(answer.body)


def error_of(answer: dict) -> str:
    error = answer["error"]
    return error if isinstance(error, str) else error["message"]


# ---------------------------------------------------------------------------------------- bodies
def test_a_logit_bias_key_of_5000_digits_is_400(app):
    """It was a 500: int() of the key raised inside the parser."""
    status, answer = serve(app, "/v1/completions", '{"model": "toy", "logit_bias": {"%s": 1}}' % DIGITS_5000)
    assert status == 400 and answer["error"]["param"] == "logit_bias"
    assert answer["error"]["message"] == "logit_bias token ids must be in [0, 50257), got a key of 5000 digits"


def test_a_logit_bias_key_with_5000_leading_zeros_is_the_id_it_spells(app, toy_model):
    key = "0" * 4999 + "42"
    body = {"model": "toy", "prompt": "Hi", "max_tokens": 3, "temperature": 0, "logit_bias": {key: 100}}
    status, answer = serve(app, "/v1/completions", json.dumps(body))
    assert status == 200 and answer["choices"][0]["text"] == toy_model.tokenizer.decode([42] * 3)


def test_a_logit_bias_that_names_a_token_twice_is_400(app):
    """ "7" and "007" are one token: its bias would be added twice (past the +-100 bound)."""
    body = {"model": "toy", "prompt": "Hi", "max_tokens": 1, "logit_bias": {"7": 100, "007": 100}}
    status, answer = serve(app, "/v1/completions", json.dumps(body))
    assert status == 400 and answer["error"]["param"] == "logit_bias"
    assert "names token 7 twice" in answer["error"]["message"]


BODIES_5000 = {  # (path, body with a 5000-digit integer)
    "score seed": ("/score", '{"input_data": ["a"], "params": {"seed": %s}}' % DIGITS_5000),
    "score max_new_tokens": ("/score", '{"input_data": ["a"], "params": {"max_new_tokens": %s}}' % DIGITS_5000),
    "completions seed": ("/v1/completions", '{"model": "toy", "seed": %s}' % DIGITS_5000),
    "completions max_tokens": ("/v1/completions", '{"model": "toy", "max_tokens": -%s}' % DIGITS_5000),
    "completions token id": ("/v1/completions", '{"model": "toy", "prompt": [1, %s]}' % DIGITS_5000),
    "completions bias value": ("/v1/completions", '{"model": "toy", "logit_bias": {"5": %s}}' % DIGITS_5000),
}


@pytest.mark.parametrize("case", BODIES_5000)
def test_an_integer_past_python_s_digit_limit_is_400_saying_so(app, case):
    """json.loads' own message told the server's operator to call sys.set_int_max_str_digits()."""
    status, answer = serve(app, *BODIES_5000[case])
    message = error_of(answer)
    assert status == 400 and "an integer of 5000 digits, more than the 4300" in message
    assert "set_int_max_str_digits" not in message


def test_the_cli_says_the_same_of_such_an_integer(monkeypatch, capsys, app, toy_folder):
    import types

    body = '{"input_data": ["a"], "params": {"seed": %s}}' % DIGITS_5000
    _, answer = serve(app, "/score", body)
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(read=lambda: body, isatty=lambda: False))
    assert cli.main(["--json", "-", "--model", str(toy_folder)], prog="gpt2np") == 2
    assert capsys.readouterr().err == f"gpt2np: error: the request on stdin: {answer['error']}\n"


BODIES_4000 = {  # (path, body with a number too large for a float, the field the answer names)
    "score temperature": ("/score", '{"input_data": ["a"], "params": {"temperature": %s}}', "params.temperature"),
    "score top_p": ("/score", '{"input_data": ["a"], "params": {"top_p": %s}}', "params.top_p"),
    "score repetition_penalty": (
        "/score",
        '{"input_data": ["a"], "params": {"repetition_penalty": %s}}',
        "params.repetition_penalty",
    ),
    "score max_new_tokens": ("/score", '{"input_data": ["a"], "params": {"max_new_tokens": %s}}', "max_new_tokens"),
    "score top_k below": ("/score", '{"input_data": ["a"], "params": {"top_k": -%s}}', "params.top_k"),
    "temperature": ("/v1/completions", '{"model": "toy", "temperature": %s}', "temperature"),
    "top_p": ("/v1/completions", '{"model": "toy", "top_p": %s}', "top_p"),
    "presence_penalty": ("/v1/completions", '{"model": "toy", "presence_penalty": %s}', "presence_penalty"),
    "frequency_penalty": ("/v1/completions", '{"model": "toy", "frequency_penalty": -%s}', "frequency_penalty"),
    "logit_bias value": ("/v1/completions", '{"model": "toy", "logit_bias": {"5": %s}}', "logit_bias[5]"),
    "logit_bias key": ("/v1/completions", '{"model": "toy", "logit_bias": {"%s": 1}}', "logit_bias"),
    "max_tokens": ("/v1/completions", '{"model": "toy", "max_tokens": %s}', "max_tokens"),
    "n": ("/v1/completions", '{"model": "toy", "n": %s}', "n"),
    "logprobs": ("/v1/completions", '{"model": "toy", "logprobs": %s}', "logprobs"),
    "best_of": ("/v1/completions", '{"model": "toy", "best_of": %s}', "best_of"),
    "token id": ("/v1/completions", '{"model": "toy", "prompt": [[%s]]}', "prompt[0]"),
    "float infinity": ("/v1/completions", '{"model": "toy", "temperature": 1e999}', "temperature"),
}


@pytest.mark.parametrize("case", BODIES_4000)
def test_a_number_too_large_for_a_float_is_400_naming_the_field(app, case):
    path, body, field = BODIES_4000[case]
    status, answer = serve(app, path, body.replace("%s", DIGITS_4000))
    assert status == 400 and field in error_of(answer), answer


def test_a_huge_seed_is_a_seed(app, toy_model):
    """Seeds are any non-negative integer (NumPy's SeedSequence takes them whole): accepted, reproducible."""
    body = {"input_data": ["a"], "params": {"seed": int(DIGITS_4000), "max_new_tokens": 4}}
    status, texts = serve(app, "/score", json.dumps(body))
    with one_blas_thread():
        assert (status, texts) == (200, toy_model.generate(["a"], seed=int(DIGITS_4000), max_new_tokens=4))


def test_best_of_true_is_not_the_number_one(app):
    status, answer = serve(app, "/v1/completions", '{"model": "toy", "best_of": true}')
    assert status == 400 and answer["error"]["message"] == "best_of must be an integer or null, got true"


# ---------------------------------------------------------------------------------------- headers and the request line
@pytest.fixture(scope="module")
def server(toy_model):
    import io

    server = in_process_server(toy_model, io.StringIO())
    yield server
    server.stop_gracefully()


def post_with_length(server, length: str, body: bytes, expect_100: bool = False) -> bytes:
    expect = "Expect: 100-continue\r\n" if expect_100 else ""
    head = (
        f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        f"{expect}Connection: close\r\n\r\n"
    ).encode()
    return raw_exchange(server.server_address[1], head + (b"" if expect_100 else body))


@pytest.mark.parametrize("expect_100", [False, True])
def test_a_content_length_of_5000_digits_is_413(server, expect_100):
    """int() of it raised inside the header check: a 500 (and with Expect: 100-continue, a dropped connection)."""
    answer = post_with_length(server, DIGITS_5000, b"", expect_100)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"the body is a 5000-digit number of bytes; this server takes at most 1000000" in answer


def test_a_content_length_with_5000_leading_zeros_is_its_number(server, toy_model):
    body = json.dumps({"input_data": ["Hi"], "params": {"max_new_tokens": 2, "do_sample": False}}).encode()
    answer = post_with_length(server, "0" * 5000 + str(len(body)), body)
    assert answer.startswith(b"HTTP/1.1 200 ")
    with one_blas_thread():
        assert json.loads(answer.partition(b"\r\n\r\n")[2]) == toy_model.generate(
            ["Hi"], max_new_tokens=2, do_sample=False
        )


def test_a_content_length_that_is_no_number_is_400_and_shown_short(server):
    answer = post_with_length(server, "x" * 5000, b"")
    assert answer.startswith(b"HTTP/1.1 400 ") and len(answer) < 1000 and b"non-negative integer" in answer


def test_an_http_version_of_many_digits_is_400(server):
    """http.server refuses it (its own int() is guarded); the answer was a bare HTTP/0.9 body quoting all
    5000 digits: now a status line, headers and a short message."""
    answer = raw_exchange(server.server_address[1], b"GET / HTTP/1." + DIGITS_5000.encode() + b"\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
    assert json.loads(body)["error"].startswith("Bad request version ('HTTP/1.999") and len(body) < 300


def test_numbers_in_a_query_string_are_not_read(server):
    """No route reads its query string: a 5000-digit number there changes nothing."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(f"GET /health?queue={DIGITS_5000} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 200 ") and json.loads(answer.partition(b"\r\n\r\n")[2])["status"] == "ok"


def test_no_500_in_the_log(server):
    """After everything above, the server's log holds no 500 and the server still answers."""
    log = server._log.getvalue()
    assert " 500 " not in log and "Traceback" not in log
    assert raw_exchange(server.server_address[1], b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200 "
    )
    assert threading.active_count() < 50
