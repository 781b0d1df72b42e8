"""The model card's request format (gpt2np.request): both shapes, every rule's message, and the same
message from the command line (`gpt2np generate --json -`) and the server (`POST /score`)."""

from __future__ import annotations

import http.client
import io
import json
import re
import threading
import types
from dataclasses import asdict

import pytest

from gpt2np import GPT2, GPT2Config, cli
from gpt2np.checkpoint import random_state_dict, save_checkpoint
from gpt2np.request import EXAMPLE, MODEL_CARD_REQUEST, PARAMS, RequestError, parse_request
from gpt2np.sampling import GenerationOptions

TOY = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=64)
KNOWN = (
    "top_p, temperature, max_new_tokens, do_sample, return_full_text, top_k, repetition_penalty, stop, seed, "
    "ignore_eos, prompt_lookup_num_tokens, max_matching_ngram_size"
)
CARD_PARAMS = json.dumps(MODEL_CARD_REQUEST["params"])


# ---------------------------------------------------------------------------------------- both shapes
def test_the_model_card_request():
    request = parse_request(json.dumps(MODEL_CARD_REQUEST))
    assert request.prompts == ["I believe the meaning of life is"]
    assert request.options == GenerationOptions(max_new_tokens=100, temperature=0.8, top_p=1.0, do_sample=True)
    assert (request.seed, request.return_full_text) == (None, True)
    assert request.prompt_field(0) == "input_data[0]" and request.param_field("top_p") == "params.top_p"
    assert request.given_params == set(MODEL_CARD_REQUEST["params"])


def test_azure_ml_shape_is_the_same_request():
    flat = {"input_data": ["a", "b"], "params": {"max_new_tokens": 5, "stop": "\n", "seed": 3, "top_k": 4}}
    nested = {"input_data": {"input_string": flat["input_data"], "parameters": flat["params"]}}
    a, b = parse_request(json.dumps(flat)), parse_request(json.dumps(nested).encode())
    assert (a.prompts, a.options, a.seed, a.return_full_text) == (b.prompts, b.options, b.seed, b.return_full_text)
    assert a.options.stop == ("\n",) and a.options.top_k == 4 and a.seed == 3
    assert b.prompt_field(1) == "input_data.input_string[1]"
    assert b.param_field("seed") == "input_data.parameters.seed"
    assert parse_request('{"input_data": {"input_string": ["x"]}}').options == GenerationOptions()


def test_params_override_the_defaults_and_the_rest_are_generation_options():
    defaults = {"max_new_tokens": 7, "seed": 2, "return_full_text": False}
    request = parse_request('{"input_data": [""], "params": {"max_new_tokens": 5}}', defaults=defaults)
    assert (request.options.max_new_tokens, request.seed, request.return_full_text) == (5, 2, False)
    assert request.options == GenerationOptions(max_new_tokens=5)
    assert request.arguments() == {**asdict(request.options), "seed": 2, "return_full_text": False}


def test_the_known_params_are_generate_s_keyword_arguments(tmp_path):
    """PARAMS is the one list: each is a keyword argument GPT2.generate takes, and none is missing."""
    assert ", ".join(PARAMS) == KNOWN
    assert set(PARAMS) == set(GenerationOptions.__dataclass_fields__) | {"seed", "return_full_text"}


# ---------------------------------------------------------------------------------------- every rule
P = '{"input_data": ["a"], "params": '  # the start of a flat request, to be followed by its params
N = '{"input_data": {"input_string": ["a"]'  # the start of a request in Azure ML's shape
BAD = [  # (body, the whole message)
    ("", f"the request is empty; send a JSON object such as {EXAMPLE}"),
    (
        b'{"input_data": ["\xff"]}',
        "the request is not UTF-8 (invalid start byte at byte 17); JSON must be encoded in UTF-8",
    ),
    (
        '{"input_data": ["a"]',
        "the request is not valid JSON (Expecting ',' delimiter: line 1 column 21 (char 20)); "
        f"a request looks like {EXAMPLE}",
    ),
    (
        P + '{"temperature": NaN}}',
        f"the request is not valid JSON (NaN is not a JSON number); a request looks like {EXAMPLE}",
    ),
    ("[" * 100_000, f"the request is nested too deeply to read; a request looks like {EXAMPLE}"),
    ('["a prompt"]', f'the request must be a JSON object like {EXAMPLE}, got ["a prompt"]'),
    ('{"params": {}}', 'the request has no "input_data": give the prompts as "input_data": ["a prompt", ...]'),
    (
        '{"input_data": ["a"], "parameters": {}}',
        'unknown key "parameters" in the request; it holds "input_data" and "params"',
    ),
    (
        '{"input_data": "a prompt"}',
        'input_data must be a non-empty list of prompt strings, got a string: wrap a single prompt as ["..."]',
    ),
    ('{"input_data": []}', 'input_data must be a non-empty list of prompt strings, like ["a prompt"], got []'),
    ('{"input_data": ["a", 3]}', "input_data[1] must be a string, got 3"),
    (P + "[1]}", f"params must be a JSON object like {CARD_PARAMS}, got [1]"),
    (P + '{"top_q": 1}}', f'unknown param "top_q" in params; the known params are {KNOWN}'),
    (P + '{"temperature": true}}', "params.temperature must be a number, got true"),
    (P + '{"top_p": "1"}}', 'params.top_p must be a number, got "1"'),
    (P + '{"max_new_tokens": 5.0}}', "params.max_new_tokens must be an integer, got 5.0"),
    (P + '{"do_sample": null}}', "params.do_sample must be true or false, got null"),
    (P + '{"return_full_text": "yes"}}', 'params.return_full_text must be true or false, got "yes"'),
    (P + '{"top_k": 2.5}}', "params.top_k must be an integer or null, got 2.5"),
    (P + '{"stop": [""]}}', 'params.stop must be a non-empty string, a list of them or null, got [""]'),
    (P + '{"seed": true}}', "params.seed must be an integer or null, got true"),
    (P + '{"ignore_eos": 0}}', "params.ignore_eos must be true or false, got 0"),
    (P + '{"top_p": 0}}', "params.top_p must be in (0, 1] (1.0 turns it off), got 0"),
    (
        P + '{"temperature": 0}}',
        "params.temperature must be > 0 when sampling, got 0; for deterministic output turn do_sample off (greedy)",
    ),
    (P + '{"temperature": 1e400}}', "params.temperature must be finite, got inf"),
    (P + '{"temperature": 1' + "0" * 400 + "}}", "params.temperature must be finite, got an integer of 401 digits"),
    (P + '{"max_new_tokens": 0}}', "params.max_new_tokens must be >= 1, got 0"),
    (P + '{"top_k": 0}}', "params.top_k must be >= 1 (or unset, to turn it off), got 0"),
    (P + '{"repetition_penalty": -1}}', "params.repetition_penalty must be > 0 (1.0 turns it off), got -1"),
    (P + '{"seed": -1}}', "params.seed must be a non-negative integer, got -1"),
    (
        '{"input_data": {"parameters": {}}}',
        'input_data has no "input_string": give the prompts as "input_string": ["a prompt", ...]',
    ),
    (N + ', "params": {}}}', 'unknown key "params" in input_data; it holds "input_string" and "parameters"'),
    (N + '}, "params": {}}', 'put the params in "params" or in "input_data"."parameters", not both'),
    ('{"input_data": {"input_string": ["a", null]}}', "input_data.input_string[1] must be a string, got null"),
    (N + ', "parameters": 3}}', f"input_data.parameters must be a JSON object like {CARD_PARAMS}, got 3"),
    (
        N + ', "parameters": {"top_p": 1.5}}}',
        "input_data.parameters.top_p must be in (0, 1] (1.0 turns it off), got 1.5",
    ),
]


@pytest.mark.parametrize("body, message", BAD, ids=range(len(BAD)))
def test_each_bad_request_names_its_field(body, message):
    with pytest.raises(RequestError) as raised:
        parse_request(body)
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)


def test_a_long_value_is_cut_in_the_message():
    with pytest.raises(RequestError, match=r'params.stop must be .*, got \["x{40,}\.\.\.$'):
        parse_request(json.dumps({"input_data": ["a"], "params": {"stop": ["x" * 500, ""]}}))


# ---------------------------------------------------------------------------------------- CLI and server agree
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    save_checkpoint(folder, TOY, random_state_dict(TOY, seed=0))
    return folder


@pytest.fixture(scope="module")
def server(folder):
    """The real ModelServer, in this process, on a loopback port."""
    from gpt2np.httpd import ModelServer

    server = ModelServer(("127.0.0.1", 0), GPT2.from_pretrained(folder), model_name="tiny", log=io.StringIO())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.stop_gracefully()


def post(server, body: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        connection.request("POST", "/score", body.encode(), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def cli_error(argv, body: str, monkeypatch, capsys) -> str:
    """What `gpt2np --json - ARGV` says on stderr with `body` on stdin."""
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(read=lambda: body, isatty=lambda: False))
    assert cli.main(["--json", "-", *argv], prog="gpt2np") == 2
    return capsys.readouterr().err


TOO_LONG = [  # requests that only a model can refuse: prompts and max_new_tokens against its 64-token context
    '{"input_data": ["a"], "params": {"max_new_tokens": 64}}',
    '{"input_data": ["a", "' + " a" * 70 + '"], "params": {"max_new_tokens": 5}}',
    '{"input_data": {"input_string": ["' + " a" * 64 + '"], "parameters": {"max_new_tokens": 1}}}',
    '{"input_data": {"input_string": ["' + " a" * 60 + '"], "parameters": {"max_new_tokens": 10}}}',
]


@pytest.mark.parametrize("body", [body for body, _ in BAD if isinstance(body, str)], ids=range(len(BAD) - 1))
def test_the_cli_and_the_server_say_the_same(body, server, folder, monkeypatch, capsys):
    status, answer = post(server, body)
    assert status == 400
    err = cli_error(["--model", str(folder)], body, monkeypatch, capsys)
    assert err == f"gpt2np: error: the request on stdin: {answer['error']}\n"


@pytest.mark.parametrize("body", TOO_LONG, ids=range(len(TOO_LONG)))
def test_the_cli_and_the_server_say_the_same_of_a_prompt_too_long(body, server, folder, monkeypatch, capsys):
    """Checked once the model is loaded (it has the tokenizer and the context): the same words, and the
    command line adds its own way out when there is one."""
    status, answer = post(server, body)
    assert status == 400
    err = cli_error(["--model", str(folder)], body, monkeypatch, capsys)
    assert re.fullmatch(
        rf"gpt2np: error: {re.escape(answer['error'])}(; or pass --truncate-prompt to keep its last "
        r"\d+ tokens)?\n",
        err,
    ), (err, answer)


def test_a_prompt_too_long_names_both_numbers_and_a_fix_that_works(server):
    """A prompt longer than the context, or as long, is told to shorten: never to lower max_new_tokens
    to a number below 1."""
    for n in (64, 70, 100):
        _, answer = post(server, json.dumps({"input_data": [" a" * n], "params": {"max_new_tokens": 5}}))
        no_room = f"input_data[0] is {n} tokens, which leaves no room to generate in the model's 64-token context"
        assert answer["error"] == no_room + "; shorten it to at most 59 tokens (with params.max_new_tokens 5)"
    _, answer = post(server, json.dumps({"input_data": [" a" * 60], "params": {"max_new_tokens": 10}}))
    too_many = "input_data[0] is 60 tokens and params.max_new_tokens is 10, more than the model's 64-token context"
    assert (
        answer["error"] == too_many + " together; lower params.max_new_tokens to 4 or shorten the prompt to 54 tokens"
    )
