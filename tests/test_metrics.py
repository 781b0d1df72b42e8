"""`GET /metrics` read with prometheus-client's own parser, after real requests: the counts equal
what was sent and answered."""

import http.client
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import JSON, in_process_server, wait_for


@pytest.fixture
def server(toy_model):
    server = in_process_server(toy_model, io.StringIO(), max_batch_size=2)
    yield server
    server.stop_gracefully()


def request(server, method, path, body=None) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=JSON)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def scrape(server) -> dict:
    """{(sample name, frozenset of labels): value} of one GET /metrics."""
    status, headers, body = request(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


NO_EOS = {"50256": -100}  # every choice runs to max_tokens, as ignore_eos does for /score


def test_counts_equal_what_was_sent(server, toy_model):
    tokenizer = toy_model.tokenizer
    card = [["Hello there", "Once upon"], ["A third prompt"]]
    for prompts in card:  # ignore_eos: exactly max_new_tokens each
        params = {"do_sample": False, "ignore_eos": True, "max_new_tokens": 5}
        assert request(server, "POST", "/score", {"input_data": prompts, "params": params})[0] == 200
    usage = []
    for body in (
        {"prompt": ["Hi", "Say"], "n": 2, "max_tokens": 4, "temperature": 0.9, "seed": 1, "logit_bias": NO_EOS},
        {"prompt": "Echo this", "max_tokens": 0, "echo": True, "logprobs": 1},  # scored, nothing generated
    ):
        status, _, answer = request(server, "POST", "/v1/completions", {"model": "tiny", **body})
        assert status == 200
        usage.append(json.loads(answer)["usage"])
    stream = {"model": "tiny", "prompt": "Stream", "max_tokens": 6, "temperature": 0, "logit_bias": NO_EOS}
    stream |= {"stream": True, "stream_options": {"include_usage": True}}
    status, _, answer = request(server, "POST", "/v1/completions", stream)
    events = [e.removeprefix(b"data: ") for e in answer.split(b"\n\n") if e]
    assert status == 200 and events[-1] == b"[DONE]"
    usage.append(json.loads(events[-2])["usage"])
    assert request(server, "POST", "/score", {"input_data": ["a"], "params": {"top_p": 2}})[0] == 400
    assert request(server, "GET", "/nowhere")[0] == 404
    assert request(server, "GET", "/v1/models/tiny")[0] == 200
    assert request(server, "GET", "/v1/models/other")[0] == 404

    samples = scrape(server)
    assert value(samples, "gpt2np_requests_total", route="/score", status="200") == 2
    assert value(samples, "gpt2np_requests_total", route="/score", status="400") == 1
    assert value(samples, "gpt2np_requests_total", route="/v1/completions", status="200") == 3
    assert value(samples, "gpt2np_requests_total", route="other", status="404") == 1
    assert value(samples, "gpt2np_requests_total", route="/v1/models/{id}", status="200") == 1
    assert value(samples, "gpt2np_requests_total", route="/v1/models/{id}", status="404") == 1
    assert value(samples, "gpt2np_requests_total", route="/metrics", status="200") == 0  # counted after its answer
    assert value(scrape(server), "gpt2np_requests_total", route="/metrics", status="200") == 1

    # Prompt tokens: each prompt once (n does not repeat it), echo-only scoring included: usage's figure.
    card_tokens = sum(len(tokenizer.encode(p)) for prompts in card for p in prompts)
    assert value(samples, "gpt2np_prompt_tokens_total") == card_tokens + sum(u["prompt_tokens"] for u in usage)
    assert sum(u["prompt_tokens"] for u in usage) == sum(
        len(tokenizer.encode(p)) for p in ("Hi", "Say", "Echo this", "Stream")
    )
    # Generated tokens: what the answers say they hold.
    assert [u["completion_tokens"] for u in usage] == [2 * 2 * 4, 0, 6]
    assert value(samples, "gpt2np_generation_tokens_total") == 3 * 5 + 16 + 0 + 6

    # One time to first token per row that generated, one time per output token per row of two or more.
    rows = 3 + 4 + 1
    assert value(samples, "gpt2np_time_to_first_token_seconds_count") == rows
    assert value(samples, "gpt2np_time_to_first_token_seconds_bucket", le="+Inf") == rows
    assert value(samples, "gpt2np_time_per_output_token_seconds_count") == rows
    assert value(samples, "gpt2np_time_per_output_token_seconds_sum") > 0
    assert value(samples, "gpt2np_rows_running") == value(samples, "gpt2np_rows_waiting") == 0


def test_generated_tokens_equal_the_answers_usage(server):
    bodies = [
        {"model": "tiny", "prompt": ["One", "Two", "Three"], "max_tokens": 7, "temperature": 1.0, "seed": s}
        for s in range(3)
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda b: request(server, "POST", "/v1/completions", b), bodies))
    assert [status for status, _, _ in answers] == [200] * 3
    usage = [json.loads(body)["usage"] for _, _, body in answers]
    samples = scrape(server)
    assert value(samples, "gpt2np_generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert value(samples, "gpt2np_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)


def test_rows_running_and_waiting_and_a_client_that_leaves(server):
    """40 rows on a batch of two: two decode, the others wait; the client leaves, its request is
    counted 499 and its rows leave both gauges."""
    import socket

    params = {"max_new_tokens": 120, "ignore_eos": True}
    body = json.dumps({"input_data": ["x"] * 40, "params": params}).encode()
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(head.encode() + body)
        wait_for(lambda: value(scrape(server), "gpt2np_rows_running") == 2, what="two rows decoding")
        samples = scrape(server)
        assert value(samples, "gpt2np_requests_waiting") == 1 and 2 <= value(samples, "gpt2np_rows_waiting") <= 38
    wait_for(
        lambda: value(scrape(server), "gpt2np_requests_total", route="/score", status="499") == 1,
        what="the 499 counted",
    )
    wait_for(lambda: value(scrape(server), "gpt2np_rows_running") == 0, what="the rows leaving")
    samples = scrape(server)
    assert value(samples, "gpt2np_rows_waiting") == value(samples, "gpt2np_requests_waiting") == 0


def test_a_client_cannot_add_labels(server):
    for i in range(30):
        assert request(server, "GET", f"/made-up-{i}")[0] == 404
    assert request(server, "GET", "/v1/models/" + "x" * 300)[0] == 404
    samples = scrape(server)
    routes = {dict(labels)["route"] for name, labels in samples if name == "gpt2np_requests_total"}
    assert routes == {"other", "/v1/models/{id}"}
    assert value(samples, "gpt2np_requests_total", route="other", status="404") == 30


def test_two_servers_in_one_process_count_apart(server, toy_model):
    other = in_process_server(toy_model, io.StringIO())
    try:
        assert request(server, "GET", "/health")[0] == 200
        assert value(scrape(server), "gpt2np_requests_total", route="/health", status="200") == 1
        assert value(scrape(other), "gpt2np_requests_total", route="/health", status="200") == 0
    finally:
        other.stop_gracefully()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process collector reads /proc")
def test_the_process_memory_is_there(server):
    samples = scrape(server)
    assert value(samples, "process_resident_memory_bytes") > 10_000_000  # NumPy and a model are loaded
    assert value(samples, "process_open_fds") > 0


def test_the_served_command_answers_metrics(toy_folder, tmp_path):
    """The route in `gpt2np serve` itself, as Prometheus scrapes it."""
    from test_server import Server

    served = Server(toy_folder, tmp_path / "server.log")
    try:
        status, headers, body = served.request("GET", "/metrics")
        names = {family.name for family in text_string_to_metric_families(body.decode())}
        assert (
            status == 200 and {"gpt2np_requests", "gpt2np_generation_tokens", "process_resident_memory_bytes"} <= names
        )
        assert served.request("HEAD", "/metrics")[0] == 405  # Prometheus scrapes with GET
    finally:
        served.stop()
