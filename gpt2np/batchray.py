"""`gpt2np batch --ray`: the same chunks, run by Ray Data on a Ray cluster (`pip install "gpt2np[ray]"`).

Only this module imports Ray, and only `gpt2np batch --ray` and users who call it import this module.

    import ray
    from gpt2np.batchray import encode_chunk, map_records
    from gpt2np.batchwork import Job, Line

    lines = [Line(1, '{"text": "A document."}'), Line(2, '{"text": "Another."}')]
    ds = ray.data.from_items([{"index": 0, "chunk": encode_chunk(lines)}])
    records = map_records(ds, Job(task="score", model="/shared/gpt2"), actors=8)

`map_records` is `Dataset.map_batches` over `RayWorker`, a callable class: each actor builds one
`gpt2np.batchwork.Worker`, which loads the model from `Job.model`, a folder every node can read (a
shared path, or the hub cache laid out alike on each node); only the small `Job` is sent to the
actors, once each, never the weights. A dataset row is a whole chunk of lines (batch_size=1), so a
chunk is run exactly as one process runs it and the records are the same. Ray retries the chunk
of an actor that dies on a new actor; a chunk's records are returned once, with its index.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator

import numpy as np
import ray
import ray.data

from .batchwork import Job, Line, ModelLoadError, Worker


def encode_chunk(lines: Iterable[Line]) -> str:
    """A chunk of lines as JSON text: a dataset column holds plain strings."""
    return json.dumps([[line.number, line.text, line.problem] for line in lines])


def decode_chunk(text: str) -> list[Line]:
    return [Line(number, line, problem) for number, line, problem in json.loads(text)]


class RayWorker:
    """The callable class of `map_records`: one Worker (one model) per actor, kept for every batch."""

    def __init__(self, job: Job):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        self.worker = Worker(job, threads=max(1, int(cpus)))  # the actor's share of the cores, as its pool

    def __call__(self, batch: dict) -> dict:
        """Rows {"index", "chunk"} -> rows {"index", "records"}: a chunk's records as JSON lines."""
        records = [self.run(chunk) for chunk in batch["chunk"]]
        return {"index": batch["index"], "records": np.array(records, dtype=object)}

    def run(self, chunk: str) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.worker(decode_chunk(chunk)))


def map_records(dataset, job: Job, *, actors: int, worker_class=RayWorker, cpus_per_actor: float = 1):
    """The dataset of chunks ({"index", "chunk"} rows) mapped to their records by `actors` actors of
    `worker_class`. An actor that dies is restarted and its chunk run again (Ray Data's actor pools
    default to max_restarts=-1 and max_task_retries=-1): Ray keeps the result of the run that finished."""
    return dataset.map_batches(
        worker_class,
        fn_constructor_args=(job,),
        batch_size=1,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=cpus_per_actor,
    )


def ray_results(
    job: Job, chunks: Iterable[list[Line]], *, address: str, actors: int, progress: bool = True, worker_class=RayWorker
) -> Iterator[list[dict]]:
    """Records chunk by chunk, in input order, from a Ray cluster at `address` ("" or "local": a
    local instance; a Ray instance already running in this process is used as it is). The chunks
    are gathered into one dataset first: the driver holds the pending input's text."""
    started = connect(address, progress=progress)
    try:
        items = [{"index": k, "chunk": encode_chunk(chunk)} for k, chunk in enumerate(chunks)]
        if not items:
            return
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # records in input order
        context.enable_progress_bars = progress
        n = actors if actors > 1 else max(1, int(ray.cluster_resources().get("CPU", 1)))
        dataset = map_records(ray.data.from_items(items), job, actors=min(n, len(items)), worker_class=worker_class)
        try:
            for row in dataset.iter_rows():
                yield [json.loads(text) for text in row["records"].splitlines()]
        except Exception as e:
            raise model_load_error(e) or e
    finally:
        if started:
            ray.shutdown()


def model_load_error(error: BaseException) -> ModelLoadError | None:
    """The ModelLoadError an actor raised, if that is what `error` wraps, so that the command reports
    the model's problem as bad input, in one line, as without Ray. Ray hands the driver its own
    exceptions: a task's error inside (`cause`, or chained), but an actor that failed in its
    constructor only as text in an ActorDiedError's message, from which the line is taken."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ModelLoadError):
            return error
        found = re.search(rf"{ModelLoadError.__name__}: (.*)", str(error))
        if found:
            return ModelLoadError(found[1].strip())
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def connect(address: str, *, progress: bool) -> bool:
    """Join the cluster (or start a local instance); True when this call started Ray."""
    if not progress:  # Ray's own notes
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    ray.init(
        address=address or "local",
        include_dashboard=False,
        log_to_driver=progress,
        logging_level=logging.INFO if progress else logging.ERROR,
    )
    return True
