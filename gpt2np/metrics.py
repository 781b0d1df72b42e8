"""`GET /metrics`: the server's figures in Prometheus' text format, as vLLM and TGI serve theirs.

Each server has its own registry (not prometheus-client's global one), so that two servers in one
process count apart. What is counted, and where:

- `gpt2np_requests_total{route, status}`: answers, counted by the HTTP edge as it logs them
  (499 when the client left first). `route` is the route's path as the route table writes it
  (`/v1/models/{id}` for every id), or `other` for a path no route has and for requests never
  routed (malformed, or refused at the connection cap): a client cannot add labels.
- `gpt2np_prompt_tokens_total`: the prompts' tokens of accepted requests, each prompt once (as
  `usage.prompt_tokens` counts them, whatever `n`), echo-only scoring included.
- `gpt2np_generation_tokens_total`: tokens generated, counted by the scheduler as each is chosen.
- `gpt2np_rows_running`, `gpt2np_rows_waiting`, `gpt2np_requests_waiting`: the batch's rows, the
  rows of accepted requests not yet in it, and those requests; read from the scheduler when scraped.
- `gpt2np_time_to_first_token_seconds`: per row, from its job's arrival in the queue to its first
  token; `gpt2np_time_per_output_token_seconds`: per row of two tokens or more, the mean time
  between its tokens. Both observed when the row's request ends.
- `process_*`: prometheus-client's process collector (resident and virtual memory, CPU seconds,
  open files), on this registry.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .jobs import Job

# Seconds. A first token waits for the queue and a prefill; later ones come a decoding step apart.
TIME_TO_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
OTHER_ROUTE = "other"


class SchedulerCollector:
    """The scheduler's figures, read when /metrics is scraped."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        load = self.scheduler.load()
        generated = CounterMetricFamily("gpt2np_generation_tokens", "Tokens generated, every request's.")
        generated.add_metric([], self.scheduler.generated_tokens)
        yield generated
        for name, value, text in (
            ("gpt2np_rows_running", load.rows_running, "Rows in the batch (decoding, or being prefilled)."),
            ("gpt2np_rows_waiting", load.rows_waiting, "Rows of accepted requests not yet in the batch."),
            ("gpt2np_requests_waiting", load.jobs_waiting, "Accepted requests with rows not yet in the batch."),
        ):
            yield GaugeMetricFamily(name, text, value=value)


class ServerMetrics:
    """One server's counters, gauges and histograms, on a registry of its own."""

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gpt2np_requests",
            "Requests answered, by route and status (499: the client left before its answer).",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "gpt2np_prompt_tokens", "Prompt tokens of accepted requests, each prompt once.", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "gpt2np_time_to_first_token_seconds",
            "Seconds from a request's arrival in the queue to a row's first token.",
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "gpt2np_time_per_output_token_seconds",
            "Mean seconds between a row's tokens after its first.",
            buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(SchedulerCollector(scheduler))
        ProcessCollector(registry=self.registry)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def prompts(self, ids: list[list[int]]) -> None:
        self.prompt_tokens.inc(sum(len(p) for p in ids))

    def job_ended(self, job: Job | None) -> None:
        """Observe the timings of a job's rows, once its request has its outcome."""
        if job is None or job.submitted_at is None:
            return
        for row in job.rows:
            if row.first_token_at is None:
                continue
            self.time_to_first_token.observe(row.first_token_at - job.submitted_at)
            if row.n_new >= 2:
                self.time_per_output_token.observe((row.last_token_at - row.first_token_at) / (row.n_new - 1))

    def exposition(self) -> tuple[bytes, str]:
        """The text /metrics answers, and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
