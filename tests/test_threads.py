"""gpt2np's thread pool (gpt2np.threads): the thread count's sources, the pool's behaviour, and the
results of the parallel forward pass against the serial one and against transformers."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from checkpoints import hf_logits, hf_reference, worst_relative_error, write_checkpoint

from gpt2np import GPT2, GPT2Config
from gpt2np.threads import (
    ENVIRONMENT_VARIABLE,
    MIN_POSITIONS,
    Pool,
    Threads,
    available_cores,
    min_positions,
    resolve_threads,
)

TOLERANCE = 1e-5  # max |threads=2 - threads=1| / max |threads=1|, logits in float32 (as the parity tests')
CONFIG = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=512, vocab_size=1000)


@pytest.fixture(scope="module")
def serial():
    return GPT2.from_random(CONFIG, seed=4, std=0.1, threads=1)


@pytest.fixture(scope="module")
def parallel(serial):
    model = GPT2(CONFIG, serial.params, serial.tokenizer, threads=2)
    model.threads.min_positions = MIN_POSITIONS  # as at gpt2's width: this toy width alone would never split
    return model


# ------------------------------------------------------------------------------- the thread count
def test_thread_count_comes_from_the_argument_then_the_environment_then_the_cores(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    assert resolve_threads() == available_cores() >= 1
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "3")
    assert resolve_threads() == 3
    assert resolve_threads(5) == 5
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, " ")
    assert resolve_threads() == available_cores()


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_environment_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, value)
    with pytest.raises(ValueError, match=f"{ENVIRONMENT_VARIABLE}=.*set it to 1 or more, or unset it"):
        resolve_threads()
    with pytest.raises(ValueError, match=ENVIRONMENT_VARIABLE):
        GPT2.from_random(GPT2Config(n_layer=1, n_head=1, n_embd=8, n_ctx=8, vocab_size=10))


@pytest.mark.parametrize(
    "value, error", [(0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError), ("2", TypeError)]
)
def test_a_bad_threads_argument_is_refused_before_any_loading(value, error, tmp_path):
    with pytest.raises(error, match="threads must be"):
        GPT2.from_pretrained(tmp_path / "missing", threads=value)  # refused before the folder is looked at


def test_the_bar_for_the_pool_scales_with_the_width_squared():
    assert min_positions(768) == MIN_POSITIONS
    assert min_positions(1024) == 144 and min_positions(1600) == 59
    assert min_positions(32) > 100_000  # a toy model never splits: the hand-outs would cost more


def test_one_thread_has_no_pool_and_holds_nothing(serial, parallel):
    assert serial.threads.n == 1 and serial.threads.pool is None
    assert parallel.threads.n == 2 and parallel.threads.pool.n == 2
    assert "threads=2" in repr(parallel)


# ------------------------------------------------------------------------------- the pool
def test_pool_runs_every_item_once_on_several_threads():
    pool = Pool(2)
    seen, lock = [], threading.Lock()

    def item(i):
        time.sleep(0.002)
        with lock:
            seen.append((i, threading.get_ident()))

    pool.map(item, range(40))
    assert sorted(i for i, _ in seen) == list(range(40))
    assert len({thread for _, thread in seen}) == 2  # the caller's thread and the worker both took items
    pool.close()


def test_pool_raises_the_first_error_after_every_started_item_is_done():
    pool = Pool(2)
    finished = []

    def item(i):
        if i == 0:
            raise KeyError("item 0")
        time.sleep(0.01)
        finished.append(i)

    with pytest.raises(KeyError, match="item 0"):
        pool.map(item, range(4))
    running = len(finished)
    time.sleep(0.05)
    assert len(finished) == running  # nothing still writes after map returned
    pool.close()


def blas_threads():
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_a_long_pass_holds_blas_to_one_thread_and_gives_it_back_even_after_an_error():
    pytest.importorskip("threadpoolctl")
    threads, before = Threads(2), blas_threads()
    with threads.forward(MIN_POSITIONS) as pool:
        assert pool is threads.pool
        assert all(n == 1 for n in blas_threads())
    assert blas_threads() == before
    with pytest.raises(RuntimeError), threads.forward(MIN_POSITIONS):
        raise RuntimeError("a failed pass")
    assert blas_threads() == before
    with threads.forward(MIN_POSITIONS - 1) as pool:  # a short pass: serial, BLAS untouched
        assert pool is None and blas_threads() == before
    threads.close()


# ------------------------------------------------------------------------------- results
def test_long_pass_on_two_threads_matches_one_thread(serial, parallel):
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 300))  # 600 positions: the pool's path
    one, two = serial(ids), parallel(ids)
    error = worst_relative_error(two, one)
    print(f"threads=2 vs threads=1, 2 x 300 tokens: worst relative difference {error:.2e} (tolerance {TOLERANCE:.0e})")
    assert error <= TOLERANCE
    assert np.array_equal(one.argmax(-1), two.argmax(-1))
    assert np.array_equal(parallel(ids), two)  # the same thread count gives the same bits, run after run


def test_short_passes_are_the_serial_pass_bit_for_bit(serial, parallel):
    """Below MIN_POSITIONS the pass runs as threads=1 does: decoding steps are exactly today's."""
    ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size, size=(2, 40))
    assert np.array_equal(serial(ids), parallel(ids))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    options = dict(max_new_tokens=20, do_sample=False)
    assert serial.generate_ids(prompts, **options) == parallel.generate_ids(prompts, **options)
    one, two = serial.score([5, 6, 7, 8, 9, 10], top=2), parallel.score([5, 6, 7, 8, 9, 10], top=2)
    assert np.array_equal(one.log_probs, two.log_probs) and np.array_equal(one.top_log_probs, two.top_log_probs)


def test_sampled_rows_are_the_same_on_any_thread_count(serial, parallel):
    prompts = [[i, i + 1] for i in range(1, 9)]  # 8 rows: the sampler runs on the pool
    options = dict(max_new_tokens=12, top_p=0.9, temperature=1.3, seed=7)
    assert serial.generate_ids(prompts, **options) == parallel.generate_ids(prompts, **options)


def test_generation_and_scores_after_a_long_prompt_match_one_thread(serial, parallel):
    prompt = [int(i) for i in np.random.default_rng(2).integers(0, CONFIG.vocab_size, size=400)]
    options = dict(max_new_tokens=8, do_sample=False)
    assert serial.generate_ids([prompt], **options) == parallel.generate_ids([prompt], **options)
    one, two = serial.score(prompt), parallel.score(prompt)
    worst = float(np.abs(one.log_probs - two.log_probs).max())
    print(f"log-probs of a 400-token text, threads=2 vs 1: worst difference {worst:.2e} (tolerance 1e-4)")
    assert worst <= 1e-4


def test_concurrent_callers_of_one_model_get_their_own_answers(serial, parallel):
    """Passes of one model run one at a time (BLAS's thread count is process-wide), so answers from
    threads sharing the model equal the answers each gets alone."""
    rng = np.random.default_rng(3)
    inputs = [rng.integers(0, CONFIG.vocab_size, size=(1, n)) for n in (300, 20, 500, 280, 30, 260)]
    alone = [parallel(ids) for ids in inputs]
    results = [None] * len(inputs)

    def call(i):
        results[i] = parallel(inputs[i])

    workers = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got, expected in zip(results, alone):
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_logits_match_transformers_on_any_thread_count(tmp_path, threads):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    config = GPT2Config(n_layer=3, n_head=8, n_embd=256, n_ctx=300, vocab_size=5000)
    folder = write_checkpoint(tmp_path, config, layout="transformers", seed=5)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 300))
    model = GPT2.from_pretrained(folder, threads=threads)
    model.threads.min_positions = MIN_POSITIONS  # 600 positions: the pool's path when threads=2
    error = worst_relative_error(model(ids), hf_logits(hf_reference(folder), ids))
    print(f"threads={threads}: worst relative difference against transformers {error:.2e} (tolerance {TOLERANCE:.0e})")
    assert error <= TOLERANCE


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_long_passes_on_its_own_pool(parallel):
    """A fork copies the pool's executor but not its worker threads: the child must start its own,
    not wait forever for threads it does not have."""
    ids = np.random.default_rng(5).integers(0, CONFIG.vocab_size, size=(1, 300))
    expected = parallel(ids)  # the parent's worker thread now exists
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            code = 0 if np.array_equal(parallel(ids), expected) else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in a long pass")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_ctrl_c_in_a_long_pass_stops_it_and_leaves_the_model_whole():
    pytest.importorskip("threadpoolctl")
    model = GPT2.from_random(GPT2Config(n_layer=6, n_head=4, n_embd=256, n_ctx=1024, vocab_size=2000), threads=2)
    model.threads.min_positions = MIN_POSITIONS
    ids = np.arange(1024) % 2000
    expected, before = model(ids), blas_threads()

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupted = 0
    try:
        for delay in (0.002, 0.01, 0.03):
            signal.setitimer(signal.ITIMER_REAL, delay)
            try:
                model(ids)
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert blas_threads() == before
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert interrupted >= 1
    assert np.array_equal(model(ids), expected)


def test_a_model_pickles_with_its_thread_settings_and_gets_threads_of_its_own(parallel):
    import pickle

    ids = np.random.default_rng(6).integers(0, CONFIG.vocab_size, size=(1, 300))
    copy = pickle.loads(pickle.dumps(parallel))
    assert (copy.threads.n, copy.threads.min_positions) == (2, MIN_POSITIONS)
    assert copy.threads.pool is not parallel.threads.pool
    assert np.array_equal(copy(ids), parallel(ids))


@pytest.mark.parametrize("n, threads, multiple", [(50257, 2, 64), (768, 3, 64), (100, 2, 1), (5, 8, 1), (64, 4, 64)])
def test_pieces_cover_the_range_once_cut_at_multiples(n, threads, multiple):
    from gpt2np.runner import pieces

    assert pieces(n, None, multiple=multiple) == [slice(0, n)]
    cut = pieces(n, Pool(threads), multiple=multiple)
    assert cut[0].start == 0 and cut[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(cut, cut[1:]))
    assert all(p.start % multiple == 0 and p.stop > p.start for p in cut)
    assert len(cut) == min(threads, -(-n // multiple))
    sizes = [p.stop - p.start for p in cut[:-1]]
    assert max(sizes, default=0) - min(sizes, default=0) <= multiple  # near-equal


def test_one_thread_never_touches_blas():
    """threads=1 is the serial code as it was: no pool, no lock, threadpoolctl not even imported."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from gpt2np import GPT2, GPT2Config\n"
        "m = GPT2.from_random(GPT2Config(n_layer=1, n_head=2, n_embd=768, n_ctx=512, vocab_size=100), threads=1)\n"
        "m(np.arange(400) % 100)\n"
        "print('threadpoolctl' in sys.modules, m.threads.pool)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None"]


def test_many_more_threads_than_cores_still_give_the_same_numbers(serial):
    """threads is not capped at the cores: 64 threads on a small machine split the work into up to
    64 parts, each computed as with any other count of parts, within the same rounding."""
    model = GPT2(CONFIG, serial.params, serial.tokenizer, threads=64)
    model.threads.min_positions = MIN_POSITIONS
    ids = np.random.default_rng(7).integers(0, CONFIG.vocab_size, size=(2, 300))
    many, one = model(ids), serial(ids)
    error = worst_relative_error(many, one)
    print(f"threads=64 vs threads=1: worst relative difference {error:.2e}")
    assert error <= TOLERANCE and np.array_equal(model(ids), many)
    model.threads.close()
