"""`gpt2np batch` on Ray: the same records as one process, and an actor that dies is retried.

A local Ray instance with two CPUs (`ray.init(num_cpus=2)`), shared by the tests of this module; a
tiny random checkpoint; a few dozen lines. Skipped when Ray is not installed (the `ray` extra).
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import test_batch  # noqa: E402
from test_batch import batch, documents, mixed_input, write_jsonl  # noqa: E402

checkpoint, model, env = test_batch.checkpoint, test_batch.model, test_batch.env  # its module-scoped fixtures

from gpt2np.batch import chunked, read_lines, run_batch  # noqa: E402
from gpt2np.batchray import RayWorker, ray_results  # noqa: E402
from gpt2np.batchwork import Job  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def one_process(model, path: Path, job: Job) -> str:
    out = io.StringIO()
    with open(path, "rb") as source:
        run_batch(job, source, out, model=model, progress=False)
    return out.getvalue()


def on_ray(path: Path, job: Job, *, worker_class=RayWorker) -> str:
    with open(path, "rb") as source:
        chunks = chunked(read_lines(source, job.input_format), job.batch_size)
        results = ray_results(job, chunks, address="", actors=2, progress=False, worker_class=worker_class)
        return "".join(json.dumps(r) + "\n" for records in results for r in records)


def test_ray_writes_what_one_process_writes(local_ray, checkpoint, model, tmp_path):
    """Greedy and seeded generations identical, scores within 1e-6 (in fact identical: same chunks)."""
    generate = mixed_input(tmp_path / "in.jsonl", n=16)  # greedy and sampled lines, and bad ones
    job = Job(model=str(checkpoint), seed=3, batch_size=3)
    assert on_ray(generate, job) == one_process(model, generate, job)
    score = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in documents(10)])
    job = Job(task="score", model=str(checkpoint), max_length=48, batch_size=4)
    for a, b in zip(on_ray(score, job).splitlines(), one_process(model, score, job).splitlines(), strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["id"] == b["id"] and a["tokens"] == b["tokens"]
        assert a["logprob_sum"] == pytest.approx(b["logprob_sum"], rel=1e-6, abs=1e-6)


class DyingOnce(RayWorker):
    """Kills its actor's process at the chunk holding line 7, the first time only (a file remembers)."""

    def __call__(self, batch):
        marker = Path(self.worker.job.model) / "died-once"
        if any('"Line 7 ' in chunk for chunk in batch["chunk"]) and not marker.exists():
            marker.touch()
            os._exit(1)
        return super().__call__(batch)


def test_an_actor_that_dies_mid_job_is_retried_without_losing_or_repeating_lines(
    local_ray, checkpoint, model, tmp_path
):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": i, "prompt": f"Line {i} says", "params": {"max_new_tokens": 6}} for i in range(12)],
    )
    folder = tmp_path / "model"
    folder.symlink_to(checkpoint, target_is_directory=True)
    job = Job(model=str(folder), seed=1, batch_size=2)
    records = on_ray(path, job, worker_class=DyingOnce)
    assert (folder / "died-once").exists(), "no actor died"
    assert records == one_process(model, path, job)


def test_the_command_with_ray_writes_the_same_file(checkpoint, env, tmp_path):
    """`gpt2np batch --ray`, its own local Ray instance, resumed from a partial output."""
    path = mixed_input(tmp_path / "in.jsonl", n=10)
    argv = [path, "--task", "generate", "--model", checkpoint, "--seed", 2, "--batch-size", 3, "--quiet"]
    one = batch([*argv, "--output", tmp_path / "one.jsonl"], env)
    assert one.returncode == 3, one.stderr
    expected = (tmp_path / "one.jsonl").read_text()
    partial = tmp_path / "ray.jsonl"
    partial.write_text("".join(expected.splitlines(keepends=True)[:4]))
    result = batch([*argv, "--output", partial, "--ray", "--workers", 2], env)
    assert result.returncode == 3, result.stderr
    assert partial.read_text() == expected


def test_a_model_the_actors_cannot_load_is_the_models_error(local_ray, tmp_path):
    """Not Ray's ActorDiedError: the command turns a ModelLoadError into its one-line status 2."""
    from gpt2np.batchwork import ModelLoadError

    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        on_ray(path, Job(model=str(tmp_path / "empty")))
