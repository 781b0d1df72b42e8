"""The server's rooms in process, with no HTTP: the routes called as plain methods (as another front
end would call them), the scheduler's own errors, and the one table that turns them into answers."""

import json
import time

import pytest
from test_server import one_blas_thread

from gpt2np.generation import prepare_prompts
from gpt2np.httperrors import CLIENT_CLOSED, HTTPError, http_error
from gpt2np.jobs import ClientGone, InternalFailure, JobError, QueueFull, ShuttingDown, TimedOut
from gpt2np.modelcard import CardJob
from gpt2np.routes import Answer, App, Call, Stream
from gpt2np.sampling import GenerationOptions
from gpt2np.scheduler import Scheduler


@pytest.fixture
def app(toy_model):
    app = App(toy_model, "toy", max_batch_size=4, max_queue=4)
    app.start()
    yield app
    app.scheduler.close()
    app.scheduler.join(timeout=30)


def card_job(model, prompt="Hello", **options) -> CardJob:
    o = GenerationOptions(**{"max_new_tokens": 5, "do_sample": False, **options})
    return CardJob([prompt], prepare_prompts(model.tokenizer, [prompt], bos=50256), o, None, False, model)


def post(app, path, body: dict, **call) -> Answer | Stream:
    name, params = app.route("POST", path)
    return app.serve(name, Call("POST", path, body=json.dumps(body).encode(), params=params, **call))


# ---------------------------------------------------------------------------------------- routes without HTTP
def test_the_card_route_answers_without_an_http_handler(app, toy_model):
    params = {"max_new_tokens": 6, "do_sample": False, "return_full_text": False}
    answer = post(app, "/score", {"input_data": ["Hello there", "Once"], "params": params})
    assert (answer.status, answer.content_type, answer.headers) == (
        200,
        "application/json",
        {"X-Shared-Batch": "false"},
    )
    with one_blas_thread():
        assert json.loads(answer.body) == toy_model.generate(["Hello there", "Once"], **params)


def test_a_bad_body_is_a_400_answer_not_an_exception(app):
    answer = post(app, "/score", {"input_data": ["a"], "params": {"top_p": 2}})
    assert answer.status == 400 and json.loads(answer.body)["error"].startswith("params.top_p must be in (0, 1]")
    answer = post(app, "/v1/completions", {"model": "toy", "n": 0})
    error = json.loads(answer.body)["error"]
    assert answer.status == 400 and error["param"] == "n" and error["type"] == "invalid_request_error"


def test_the_completions_stream_is_a_generator_of_events(app, toy_model):
    body = {"model": "toy", "prompt": "Hello", "max_tokens": 7, "temperature": 0, "stream": True}
    stream = post(app, "/v1/completions", body)
    assert isinstance(stream, Stream) and stream.content_type == "text/event-stream"
    events = b"".join(stream.chunks).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""] and stream.status == 200
    text = "".join(json.loads(e.removeprefix(b"data: "))["choices"][0]["text"] for e in events[:-2])
    with one_blas_thread():
        assert text == toy_model.complete("Hello", do_sample=False, max_new_tokens=7).text


def test_a_front_end_that_closes_a_stream_frees_its_rows(app):
    """A front end that can no longer write closes the generator: the job fails with ClientGone."""
    submitted = []
    submit = app.scheduler.submit
    app.scheduler.submit = lambda job: (submitted.append(job), submit(job))[1]
    body = {"model": "toy", "prompt": "Once", "max_tokens": 100, "temperature": 0, "stream": True, "n": 3}
    stream = post(app, "/v1/completions", body)
    next(stream.chunks)  # the stream has begun
    stream.chunks.close()
    (job,) = submitted
    assert isinstance(job.error, ClientGone) and stream.status == CLIENT_CLOSED
    deadline = time.monotonic() + 30
    while app.scheduler.depth() != (0, 0):
        assert time.monotonic() < deadline, "the rows stayed in the batch"
        time.sleep(0.02)


def test_a_client_that_leaves_while_waiting_is_a_499_answer(app):
    """40 rows of 100 tokens on a batch of four: far longer than the first look at the client."""
    body = {"input_data": ["Once"] * 40, "params": {"max_new_tokens": 100, "ignore_eos": True, "do_sample": False}}
    looks = []
    answer = post(app, "/score", body, client_gone=lambda: looks.append(1) or True, poll=0.05)
    assert answer.status == CLIENT_CLOSED and answer.detail == "the client closed the connection"
    assert len(looks) == 1  # it failed the job at the first look


def test_a_model_needs_a_name(toy_model):
    with pytest.raises(ValueError, match="at least one name"):
        App(toy_model, [])


def test_routes_and_methods(app):
    assert app.route("GET", "/health") == ("health", {})
    with pytest.raises(HTTPError) as caught:
        app.route("GET", "/score")
    assert caught.value.status == 405 and caught.value.headers == {"Allow": "POST"}
    with pytest.raises(HTTPError, match="no route GET /nowhere; the routes are POST /score") as caught:
        app.route("GET", "/nowhere")
    assert caught.value.status == 404


# ---------------------------------------------------------------------------------------- domain errors
def test_the_scheduler_raises_its_own_errors_not_http_ones(toy_model):
    scheduler = Scheduler(toy_model, max_batch_size=2, max_queue=1)  # not started: nothing leaves the queue
    scheduler.submit(card_job(toy_model))
    with pytest.raises(QueueFull) as caught:
        scheduler.submit(card_job(toy_model))
    assert caught.value.max_queue == 1 and not isinstance(caught.value, HTTPError)
    scheduler.close()
    with pytest.raises(ShuttingDown):
        scheduler.submit(card_job(toy_model))


def test_a_failing_step_fails_its_jobs_with_internal_failure(toy_model, monkeypatch):
    scheduler = Scheduler(toy_model, max_batch_size=4, max_queue=4)
    jobs = [card_job(toy_model, "One"), card_job(toy_model, "Two")]
    for job in jobs:
        scheduler.submit(job)
    with one_blas_thread():
        scheduler._join(scheduler._admit())
    monkeypatch.setattr(scheduler.engine, "forward", lambda: (_ for _ in ()).throw(IndexError("planted")))
    scheduler._step_or_fail()
    for job in jobs:
        assert isinstance(job.error, InternalFailure) and isinstance(job.error.cause, IndexError)
    assert not scheduler.engine.busy  # a fresh engine: the next jobs start clean


def test_a_call_fails_a_job_it_waits_for_with_timed_out(toy_model):
    job = card_job(toy_model)  # never submitted: it never ends by itself
    started = time.monotonic()
    Call("POST", "/score", timeout=0.3, poll=0.05).wait(job)
    assert isinstance(job.error, TimedOut) and job.error.seconds == 0.3
    assert 0.25 < time.monotonic() - started < 5


ANSWERS = [  # (error, status, headers, message): today's answers, written once in httperrors
    (QueueFull(64), 503, {"Retry-After": "1"}, "the queue is full (64 requests waiting); retry shortly"),
    (
        ShuttingDown(),
        503,
        {"Connection": "close"},
        "the server is shutting down; send the request again to a running server",
    ),
    (
        TimedOut(300),
        504,
        {},
        "the request did not finish within 300 s (the server's --timeout); ask for fewer prompts or max_new_tokens",
    ),
    (ClientGone(), 499, {}, "the client closed the connection"),
    (InternalFailure(IndexError("x")), 500, {}, "internal error (IndexError); the server log has the details"),
    (JobError("a kind not in the table"), 500, {}, "internal error (JobError); the server log has the details"),
    (KeyError("k"), 500, {}, "internal error (KeyError); the server log has the details"),
]


@pytest.mark.parametrize("error, status, headers, message", ANSWERS, ids=[type(a[0]).__name__ for a in ANSWERS])
def test_each_job_error_has_one_answer(error, status, headers, message):
    answer = http_error(error)
    assert (answer.status, answer.headers, answer.message) == (status, headers, message)
    if status == 500:
        assert answer.detail  # the cause, for the log only


def test_an_internal_failure_logs_its_cause_not_the_client():
    answer = http_error(InternalFailure(IndexError("a planted failure\nin two lines")))
    assert "planted" not in answer.message and answer.detail == "IndexError: a planted failure in two lines"
