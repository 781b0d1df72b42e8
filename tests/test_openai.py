"""`gpt2np serve` through OpenAI's own client: `POST /v1/completions`, `GET /v1/models`, the errors it
raises, and the server-sent events on the wire. The server runs as a subprocess on a loopback port;
answers are checked against `GPT2.complete` and gpt2np.evaluate's scoring, run here."""

import json
import re
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2np import GPT2, GPT2Config
from gpt2np.scoring import score_tokens

openai = pytest.importorskip("openai")

from test_server import Server, checkpoint, one_blas_thread, wait_for  # noqa: E402

LONG = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=1024)


@pytest.fixture(scope="module")
def model(toy_model) -> GPT2:
    """The shared toy checkpoint (tests/conftest.py), loaded as the server loads it."""
    return toy_model


@pytest.fixture(scope="module")
def server(toy_folder, tmp_path_factory):
    server = Server(toy_folder, tmp_path_factory.mktemp("log") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    """OpenAI's client pointed at the server; no retries, so each error is seen once."""
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def name(toy_folder) -> str:
    return toy_folder.name  # the served model's name: its --model, a local folder by its last component only


def complete(model, prompts, **options):
    with one_blas_thread():
        return model.complete(prompts, **options)


# ---------------------------------------------------------------------------------------- completions
def test_models_lists_the_served_model(client, name):
    (card,) = client.models.list().data
    assert (card.id, card.object, card.owned_by) == (name, "model", "gpt2np")


def test_a_plain_completion(client, model, name):
    answer = client.completions.create(model=name, prompt="Hello, my dog is", max_tokens=8, temperature=0)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-") and answer.model == name
    (choice,) = answer.choices
    expected = complete(model, "Hello, my dog is", do_sample=False, max_new_tokens=8)
    assert (choice.text, choice.index, choice.finish_reason, choice.logprobs) == (expected.text, 0, "length", None)
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected.prompt_ids), 8)
    assert usage.total_tokens == usage.prompt_tokens + 8


def test_the_default_is_sixteen_sampled_tokens(client, name):
    answer = client.completions.create(model=name, prompt="Hi")
    assert answer.usage.completion_tokens == 16 or answer.choices[0].finish_reason == "stop"


def test_prompts_as_strings_ids_and_id_lists(client, model, name):
    strings = ["Once upon a time", "", "<|endoftext|>The"]
    ids = [model.tokenizer.encode(s, allowed_special="all") or [model.config.bos_token_id] for s in strings]
    greedy = dict(do_sample=False, max_new_tokens=6)
    expected = [c.text for c in complete(model, strings, **greedy)]
    for prompt in (strings, ids):
        answer = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        assert [c.text for c in answer.choices] == expected
    answer = client.completions.create(model=name, prompt=ids[0], max_tokens=6, temperature=0)
    assert [c.text for c in answer.choices] == expected[:1]


def test_n_choices_and_seeded_reproducibility(client, model, name):
    ask = dict(model=name, prompt=["The capital of", "Say"], n=3, max_tokens=7, temperature=0.9, top_p=0.95, seed=11)
    answer = client.completions.create(**ask)
    texts = [c.text for c in answer.choices]
    assert [c.index for c in answer.choices] == list(range(6))
    # Choice i * n + j draws from the seed's child i * n + j: GPT2.complete on each prompt repeated n times.
    library = complete(
        model, ["The capital of"] * 3 + ["Say"] * 3, max_new_tokens=7, temperature=0.9, top_p=0.95, seed=11
    )
    assert texts == [c.text for c in library]
    assert [c.text for c in client.completions.create(**ask).choices] == texts
    assert len(set(texts[:3])) > 1  # three samples, not one repeated
    assert [c.text for c in client.completions.create(**{**ask, "seed": 12}).choices] != texts


def test_stop_strings(client, model, name):
    full = complete(model, "Hello world", do_sample=False, max_new_tokens=12).text
    stop = full[4:7]
    answer = client.completions.create(
        model=name, prompt="Hello world", max_tokens=12, temperature=0, stop=[stop, "never here"]
    )
    (choice,) = answer.choices
    assert (choice.text, choice.finish_reason) == (full[: full.find(stop)], "stop")


def test_penalties_and_logit_bias(client, model, name):
    options = dict(max_tokens=8, temperature=0, presence_penalty=1.5, frequency_penalty=0.5, logit_bias={"42": 4})
    answer = client.completions.create(model=name, prompt="Hi", **options)
    expected = complete(
        model, "Hi", do_sample=False, max_new_tokens=8, presence_penalty=1.5, frequency_penalty=0.5, logit_bias={42: 4}
    )
    assert answer.choices[0].text == expected.text
    forced = client.completions.create(model=name, prompt="Hi", max_tokens=3, temperature=0, logit_bias={"42": 100})
    assert forced.choices[0].text == model.tokenizer.decode([42] * 3)


def test_user_is_accepted_and_best_of_one_is_the_default(client, name):
    answer = client.completions.create(model=name, prompt="Hi", max_tokens=2, user="someone", best_of=1, suffix=None)
    assert answer.usage.completion_tokens <= 2


# ---------------------------------------------------------------------------------------- served names
@pytest.fixture(scope="module")
def named_server(toy_folder, tmp_path_factory):
    """--served-model-name twice: the names clients hard-code (lm-evaluation-harness sends model=gpt2)."""
    flags = ("--served-model-name", "gpt2", "--served-model-name", "org/alias", "gpt2")  # a repeat counts once
    server = Server(toy_folder, tmp_path_factory.mktemp("log") / "server.log", *flags)
    yield server
    server.stop()


def test_served_model_names_are_listed_and_accepted(named_server, model, toy_folder):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{named_server.port}/v1", api_key="-", max_retries=0)
    assert [card.id for card in client.models.list().data] == ["gpt2", "org/alias"]
    expected = complete(model, "Hello", do_sample=False, max_new_tokens=5).text
    for name in ("gpt2", "org/alias"):
        answer = client.completions.create(model=name, prompt="Hello", max_tokens=5, temperature=0)
        assert (answer.model, answer.choices[0].text) == (name, expected)  # the answer names what was asked
    with pytest.raises(openai.NotFoundError) as caught:  # the folder's name is no longer one of them
        client.completions.create(model=toy_folder.name, prompt="Hello")
    assert caught.value.code == "model_not_found" and 'this server serves "gpt2", "org/alias"' in caught.value.message
    assert named_server.health()["model"] == "gpt2"
    assert "serving gpt2, org/alias on http://" in named_server.log()


def test_retrieve_a_model_by_its_id(named_server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{named_server.port}/v1", api_key="-", max_retries=0)
    card = client.models.retrieve("gpt2")
    assert (card.id, card.object, card.owned_by) == ("gpt2", "model", "gpt2np") and isinstance(card.created, int)
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4")
    error = caught.value
    assert error.status_code == 404 and (error.code, error.param) == ("model_not_found", "model")
    assert error.type == "invalid_request_error" and "gpt-4" in error.message
    for path in ("/v1/models/org/alias", "/v1/models/org%2Falias"):  # a hub-style name, its slash raw or escaped
        status, _, body = named_server.request("GET", path)
        assert (status, json.loads(body)["id"]) == (200, "org/alias")


def test_retrieve_model_routes_and_methods(named_server):
    status, headers, body = named_server.request("POST", "/v1/models/gpt2", b"{}", {"Content-Type": "application/json"})
    assert status == 405 and headers["Allow"] == "GET" and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _, body = named_server.request("GET", "/v1/models/")
    assert status == 404 and "GET /v1/models/{id}" in json.loads(body)["error"]["message"]


def test_the_default_name_is_retrievable(client, name):
    assert client.models.retrieve(name).id == name


@pytest.mark.parametrize("value", ["", "  ", "a\x1bb"])
def test_a_bad_served_model_name_is_one_line_and_status_2(value, capsys):
    from gpt2np import server

    assert server.main(["--served-model-name", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2np serve: error: argument --served-model-name: must not ") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------- log-probs
def test_logprobs_of_generated_tokens(client, model, name):
    prompt = "Once upon a time there"
    answer = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=1.2, seed=3, logprobs=3)
    (choice,) = answer.choices
    lp = choice.logprobs
    done = complete(model, prompt, max_new_tokens=10, temperature=1.2, seed=3, logprobs=3)
    assert choice.text == done.text and "".join(lp.tokens) == choice.text
    scored = model.score(done.prompt_ids + done.ids, top=3)
    tail = slice(len(done.prompt_ids) - 1, None)
    np.testing.assert_allclose(lp.token_logprobs, scored.log_probs[tail], atol=1e-5)
    for top, token, token_lp, ids, lps in zip(
        lp.top_logprobs, lp.tokens, lp.token_logprobs, scored.top_ids[tail], scored.top_log_probs[tail]
    ):
        expected = {model.tokenizer.decode([int(i)]): float(v) for i, v in zip(ids, lps)}
        expected.setdefault(token, token_lp)  # the chosen token is always there: up to k + 1 entries
        assert top.keys() == expected.keys() and np.allclose(list(top.values()), list(expected.values()), atol=1e-5)
    # Offsets count from the start of the prompt, echoed or not.
    assert lp.text_offset[0] == len(prompt)
    assert [prompt + choice.text][0][lp.text_offset[2] :].startswith(lp.tokens[2])


def test_echo_scores_the_prompt_as_evaluate_does(client, model, name):
    """How evaluation harnesses score through the API: echo, max_tokens 0, logprobs."""
    texts = ["The quick brown fox jumps over the lazy dog.", "Über naïve café — 東京"]
    answer = client.completions.create(model=name, prompt=texts, max_tokens=0, echo=True, logprobs=1)
    assert answer.usage.completion_tokens == 0
    for text, choice in zip(texts, answer.choices):
        ids = model.tokenizer.encode(text)
        ((reference, _),) = score_tokens(model, [(ids, 1)], progress=False)
        lp = choice.logprobs
        assert choice.text == text and choice.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        np.testing.assert_allclose(lp.token_logprobs[1:], reference, rtol=0, atol=1e-5)
        assert len(lp.tokens) == len(ids) and all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])


def test_echo_with_generation(client, model, name):
    answer = client.completions.create(
        model=name, prompt="Hello there", max_tokens=4, temperature=0, echo=True, logprobs=0
    )
    (choice,) = answer.choices
    done = complete(model, "Hello there", do_sample=False, max_new_tokens=4, logprobs=0)
    assert choice.text == "Hello there" + done.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(done.prompt_ids) + len(done.ids)
    np.testing.assert_allclose(
        lp.token_logprobs[len(done.prompt_ids) :], [t.log_prob for t in done.log_probs], atol=1e-5
    )
    assert all(choice.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))


# ---------------------------------------------------------------------------------------- streaming
def test_streamed_pieces_join_to_the_whole_answer(client, name):
    ask = dict(model=name, prompt=["Once", "Twice"], n=2, max_tokens=12, temperature=0.8, seed=9, logprobs=1)
    whole = client.completions.create(**ask)
    texts, tokens, finish = [""] * 4, [[] for _ in range(4)], [None] * 4
    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and all(c.object == "text_completion" for c in chunks)
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        assert finish[choice.index] is None  # nothing after a choice's finish_reason
        texts[choice.index] += choice.text
        tokens[choice.index] += choice.logprobs.tokens
        finish[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices] and finish == [c.finish_reason for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_streamed_stop_string_is_never_sent(client, model, name):
    """Text that a stop string could still remove is held back, so no piece has to be taken back."""
    full = complete(model, "Hello world", do_sample=False, max_new_tokens=20).text
    stop = full[8:14]
    ask = dict(model=name, prompt="Hello world", max_tokens=20, temperature=0, stop=stop, logprobs=0)
    whole = client.completions.create(**ask).choices[0]
    chunks = list(client.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text == full[: full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "stop"
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == whole.logprobs.tokens
    assert all(o < len("Hello world") + len(whole.text) for o in whole.logprobs.text_offset)


def test_streamed_echo_scoring(client, name):
    chunks = list(
        client.completions.create(model=name, prompt="Score me", max_tokens=0, echo=True, logprobs=2, stream=True)
    )
    (chunk,) = chunks
    (choice,) = chunk.choices
    assert (choice.text, choice.finish_reason, choice.logprobs.token_logprobs[0]) == ("Score me", "length", None)


def sse_request(port: int, body: dict) -> bytes:
    """A raw POST /v1/completions; everything the server sends until it closes the connection."""
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_server_sent_events_byte_for_byte(server, model, name):
    raw = sse_request(
        server.port, {"model": name, "prompt": "Hello", "max_tokens": 9, "temperature": 0, "stream": True}
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert (headers["Content-Type"], headers["Cache-Control"], headers["Connection"]) == (
        "text/event-stream",
        "no-cache",
        "close",
    )
    assert "Content-Length" not in headers and "Transfer-Encoding" not in headers  # the body ends at the close
    events = body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]  # the last event, then nothing
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    # Each event is exactly `data: ` + the chunk as one line of JSON + a blank line.
    rebuilt = b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in chunks)
    assert body == rebuilt + b"data: [DONE]\n\n"
    first = chunks[0]
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", first["id"]) and isinstance(first["created"], int)
    for chunk in chunks:
        assert {k: chunk[k] for k in ("id", "object", "created", "model")} == {
            k: first[k] for k in ("id", "object", "created", "model")
        } | {"object": "text_completion", "model": name}
        (choice,) = chunk["choices"]
        assert set(choice) == {"text", "index", "logprobs", "finish_reason"} and choice["logprobs"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    expected = complete(model, "Hello", do_sample=False, max_new_tokens=9).text
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_an_error_before_the_stream_is_an_ordinary_answer(server, name):
    raw = sse_request(server.port, {"model": name, "prompt": "Hi", "stream": True, "n": 0})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and json.loads(body)["error"]["param"] == "n"


# ---------------------------------------------------------------------------------------- errors
BAD = {
    # name: (arguments of completions.create, the param named, words of the message)
    "best_of": (dict(best_of=2), "best_of", "not supported"),
    "suffix": (dict(suffix="the end"), "suffix", "cannot insert"),
    "logprobs above 5": (dict(logprobs=6), "logprobs", "[0, 5]"),
    "n zero": (dict(n=0), "n", "[1, 128]"),
    "temperature above 2": (dict(temperature=2.5), "temperature", "[0, 2]"),
    "top_p zero": (dict(top_p=0), "top_p", "(0, 1]"),
    "five stop strings": (dict(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    "max_tokens zero without echo": (dict(max_tokens=0), "max_tokens", "only with echo"),
    "past the context": (dict(max_tokens=200), "prompt", "128-token context"),
    "presence_penalty": (dict(presence_penalty=3), "presence_penalty", "[-2, 2]"),
    "logit_bias value": (dict(logit_bias={"5": 200}), "logit_bias", "[-100, 100]"),
    "logit_bias key": (dict(logit_bias={"five": 1}), "logit_bias", "token ids"),
    "logit_bias id": (dict(logit_bias={"99999": 1}), "logit_bias", "[0, 50257)"),
    "negative seed": (dict(seed=-1), "seed", "non-negative"),
    "prompt mixed": (dict(prompt=["a", 1]), "prompt", "not a mix"),
    "prompt id out of range": (dict(prompt=[1, 60000]), "prompt", "[0, 50257)"),
    "empty prompt list": (dict(prompt=[]), "prompt", "must be a string"),
    "stream_options without stream": (dict(stream_options={"include_usage": True}), "stream_options", "stream"),
    "unknown field": (dict(extra_body={"top_k": 5}), "top_k", "unknown field"),
    "temperature a string": (dict(extra_body={"temperature": "hot"}), "temperature", "a number"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_request_is_400_in_openai_s_shape(client, name, case):
    arguments, param, words = BAD[case]
    arguments = {"prompt": "Hi", **arguments}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=name, **arguments)
    error = caught.value
    assert error.status_code == 400 and error.param == param and words in error.message
    assert error.type == "invalid_request_error" and set(error.body) == {"message", "type", "param", "code"}


def test_a_lone_surrogate_is_400_before_any_token(server, name):
    """JSON can spell a lone surrogate (OpenAI's client cannot send one: a raw request)."""
    body = b'{"model": ' + json.dumps(name).encode() + b', "prompt": "a\\udcff"}'
    status, _, answer = server.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    error = json.loads(answer)["error"]
    assert status == 400 and error["param"] == "prompt" and "not valid Unicode" in error["message"]


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi")
    assert caught.value.code == "model_not_found" and "this server serves" in caught.value.message


def test_chat_completions_is_404_saying_why(client, name):
    with pytest.raises(openai.NotFoundError, match="no chat template") as caught:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}])
    assert "/v1/completions" in caught.value.message


def test_unknown_route_is_404_in_openai_s_shape(client):
    with pytest.raises(openai.NotFoundError, match="no route POST /v1/embeddings"):
        client.embeddings.create(model="x", input="Hi")


def test_model_card_route_keeps_its_own_error_shape(server):
    status, _, body = server.request("POST", "/score", b"{}", {"Content-Type": "application/json"})
    assert status == 400 and isinstance(json.loads(body)["error"], str)


# ---------------------------------------------------------------------------------------- slow requests
@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A 1024-token context, two rows at a time and a 3 s --timeout: requests that cannot finish."""
    folder = checkpoint(tmp_path_factory.mktemp("long"), LONG)
    server = Server(folder, tmp_path_factory.mktemp("log") / "server.log", "--max-batch-size", "2", "--timeout", "3")
    yield server
    server.stop()


def long_request(server) -> dict:
    """64 choices of 1000 tokens two at a time: 32,000 steps, far more than any test waits."""
    return {
        "model": Path(server.proc.args[server.proc.args.index("--model") + 1]).name,
        "prompt": "Once",
        "n": 64,
        "max_tokens": 1000,
        "temperature": 0,
    }


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_streaming_client_that_leaves_stops_its_rows(long_server, how):
    data = json.dumps({**long_request(long_server), "stream": True}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    pattern = re.compile(r" POST /v1/completions 499 prompts=64 new_tokens=(\d+) ")
    before = len(pattern.findall(long_server.log()))
    sock = socket.create_connection(("127.0.0.1", long_server.port), timeout=30)
    try:
        sock.sendall(head + data)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")  # the stream has begun
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    log = long_server.log_when(lambda text: len(pattern.findall(text)) > before, timeout=30)
    assert len(pattern.findall(log)) == before + 1, log
    assert int(pattern.findall(log)[-1]) < 64 * 1000 // 4
    long_server.wait_until(lambda h: h["batch_rows"] == 0 and h["queue_depth"] == 0)


def test_a_request_past_the_timeout_is_504(long_server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{long_server.port}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError, match="--timeout") as caught:
        client.completions.create(**long_request(long_server))
    assert caught.value.status_code == 504
    long_server.wait_until(lambda h: h["batch_rows"] == 0 and h["queue_depth"] == 0)
    with pytest.raises(openai.APIError, match="--timeout"):  # a stream says so in an error event
        for _ in client.completions.create(**long_request(long_server), stream=True):
            pass
    wait_for(lambda: long_server.health()["batch_rows"] == 0, what="the rows leaving")


def test_the_server_s_limits_hold_before_tokenizing(client, server, name):
    """/v1/completions keeps /score's cheap limits: rows (prompts times n) within --max-prompts (256
    by default), and a prompt with more bytes than the context can hold refused before it is tokenized."""
    with pytest.raises(openai.BadRequestError, match=r"ask for 300 completions; this server makes at most 256"):
        client.completions.create(model=name, prompt=["a", "b", "c"], n=100, max_tokens=1)
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError, match=r"prompt is 300000 bytes, at least 2344 tokens, more than"):
        client.completions.create(model=name, prompt="x" * 300_000, max_tokens=1)
    assert time.monotonic() - started < 2.0  # tokenizing one 300 KB word takes seconds


# ---------------------------------------------------------------------------------------- echo in the batch
@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    """A server of a 1024-token toy model prefilling 16 tokens a step, for echo requests that take
    many steps."""
    folder = checkpoint(tmp_path_factory.mktemp("echo"), LONG)
    server = Server(folder, tmp_path_factory.mktemp("log") / "server.log", "--prefill-chunk", "16", "--timeout", "300")
    yield server, folder.name, GPT2.from_pretrained(folder), folder
    server.stop()


def health(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as answer:
        return json.loads(answer.read())


def echo_body(name, prompts) -> dict:
    return {"model": name, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1}


def test_echo_scoring_is_rows_of_the_batch_a_chunk_at_a_time(echo_server):
    """A 900-token echo prefills 16 tokens a step beside the other rows: a stream that starts after
    it ends before it, and its scores are still scoring's, within 1e-5."""
    import threading

    server, name, model, _ = echo_server
    ids = np.random.default_rng(3).integers(0, 50000, size=900).tolist()
    done = {}

    def echo():
        done["answer"] = json.loads(sse_request_whole(server.port, echo_body(name, [ids])))
        done["at"] = time.monotonic()

    thread = threading.Thread(target=echo)
    thread.start()
    wait_for(lambda: health(server.port)["batch_rows"] == 1, what="the echo's row in the batch")
    raw = sse_request(server.port, {"model": name, "prompt": "Hi", "max_tokens": 24, "temperature": 0, "stream": True})
    streamed_at = time.monotonic()
    thread.join(120)
    assert raw.endswith(b"data: [DONE]\n\n") and "answer" in done
    assert streamed_at < done["at"]  # 24 steps of the stream came before the echo's 57 chunks ended
    ((reference, _),) = score_tokens(model, [(ids, 1)], progress=False)
    got = done["answer"]["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None
    np.testing.assert_allclose(got[1:], reference, rtol=0, atol=1e-5)


def sse_request_whole(port: int, body: dict) -> bytes:
    """A raw POST /v1/completions answered whole: its body."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, f"{response.status} {body[:300]!r}"
        return body
    finally:
        connection.close()


def test_an_echo_whose_client_left_stops_and_one_past_the_timeout_is_a_504(echo_server, tmp_path):
    """12 echo prompts of 600 tokens: sent whole, the answer takes some time T. Sent again and
    dropped at once, the server's batch is empty again well within T (the rows left at their next
    chunk: the work for a gone client stops). Past --timeout, the answer is a 504."""
    server, name, _, folder = echo_server
    prompts = [np.random.default_rng(i).integers(0, 50000, size=600).tolist() for i in range(12)]
    started = time.monotonic()
    sse_request_whole(server.port, echo_body(name, prompts))
    whole = time.monotonic() - started
    data = json.dumps(echo_body(name, prompts)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        wait_for(lambda: health(server.port)["batch_rows"] > 0, what="the echo's rows in the batch")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, as a killed client
    left = time.monotonic()
    wait_for(lambda: health(server.port)["batch_rows"] == 0 and health(server.port)["queue_depth"] == 0, timeout=whole)
    gone = time.monotonic() - left
    print(f"12 x 600-token echo: whole {whole:.2f} s; rows gone {gone:.2f} s after the client left")
    assert gone < 0.5 * whole
    assert " 499 " in server.log_when(lambda log: " 499 " in log)
    timeout = round(whole / 4, 2)
    bounded = Server(folder, tmp_path / "timeout.log", "--prefill-chunk", "16", "--timeout", str(timeout))
    try:
        started = time.monotonic()
        with pytest.raises(AssertionError, match="504") as failure:
            sse_request_whole(bounded.port, echo_body(name, prompts))
        assert "--timeout" in str(failure.value)
        assert time.monotonic() - started < timeout + 0.5 * whole
        wait_for(lambda: health(bounded.port)["batch_rows"] == 0, timeout=whole)  # and its rows left the batch
    finally:
        bounded.stop()
