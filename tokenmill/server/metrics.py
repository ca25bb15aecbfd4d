"""What `/metrics` exposes, in Prometheus' text format: the engine's counters and gauges, request
latency histograms, and each running batch's progress.

The latency histograms (queue time, time to first token, time per output token, end to end) are
observed from a finished request's `RequestMetrics` timestamps by whoever receives its output:
the HTTP handler for interactive requests (label kind="interactive"), the batch's thread for
batch requests (kind="batch"). The engine's step loop only stamps the times; it never observes.
Requests that never ran (refused, failed) and embeddings (which stamp no times) are not observed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tokenmill.engine.client import ThreadClient
from tokenmill.engine.engine import EngineMetrics
from tokenmill.engine.threaded import EngineThread
from tokenmill.outputs import EngineOutput, RequestOutput

if TYPE_CHECKING:
    from tokenmill.server.batches import BatchManager

KINDS = ("interactive", "batch")
# vLLM's buckets: fine below a second for interactive requests, up to hours for a batch's queue.
FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
PER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class LatencyHistograms:
    """The four request latency histograms, by kind ("interactive" or "batch"), in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            made = Histogram(name, doc, ["kind"], buckets=buckets, registry=registry)
            for kind in KINDS:  # every series shown from the start, at zero
                made.labels(kind)
            return made

        self.queue = histogram("tokenmill_request_queue_time_seconds",
                               "From the engine queueing a request to its first admission to a step", REQUEST_BUCKETS)
        self.first_token = histogram("tokenmill_time_to_first_token_seconds",
                                     "From the engine queueing a request to its first token", FIRST_TOKEN_BUCKETS)
        self.per_token = histogram("tokenmill_time_per_output_token_seconds",
                                   "Decode time per output token after the first (of a request's longest sample)",
                                   PER_TOKEN_BUCKETS)
        self.end_to_end = histogram("tokenmill_e2e_request_latency_seconds",
                                    "From the engine queueing a request to its end", REQUEST_BUCKETS)

    def observe(self, output: EngineOutput, kind: str) -> None:
        """Observes a finished request that ran; anything else is ignored."""
        if not isinstance(output, RequestOutput) or not output.finished or output.metrics is None:
            return
        times = output.metrics
        if times.first_scheduled_time is None or times.finished_time is None:
            return
        self.queue.labels(kind).observe(times.first_scheduled_time - times.arrival_time)
        self.end_to_end.labels(kind).observe(times.finished_time - times.arrival_time)
        if times.first_token_time is None:  # a prompt-only request
            return
        self.first_token.labels(kind).observe(times.first_token_time - times.arrival_time)
        tokens = max((len(c.token_ids) for c in output.outputs), default=0)
        if tokens > 1:
            self.per_token.labels(kind).observe((times.finished_time - times.first_token_time) / (tokens - 1))


class ObservedClient(ThreadClient):
    """A ThreadClient (outputs queued for `next_outputs`) that hands each output it returns to
    `observe`, in the caller's thread: a batch's latencies, observed off the step loop."""

    def __init__(self, engine_thread: EngineThread, priority: int, observe: Callable[[EngineOutput], None]) -> None:
        super().__init__(engine_thread, priority)
        self.observe = observe

    def next_outputs(self, timeout: float = 0.5) -> list[EngineOutput]:
        outputs = super().next_outputs(timeout)
        for output in outputs:
            self.observe(output)
        return outputs


class EngineCollector:
    """The engine's counters and gauges, from its metrics snapshot at each scrape."""

    def __init__(self, metrics: Callable[[], EngineMetrics]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics()
        stats = metrics.stats
        yield CounterMetricFamily("tokenmill_requests_finished", "Requests finished", value=stats.requests_finished)
        yield CounterMetricFamily("tokenmill_requests_failed_internally", "Requests failed inside the engine",
                                  value=stats.requests_failed_internally)
        yield CounterMetricFamily("tokenmill_prompt_tokens", "Prompt tokens of finished requests",
                                  value=stats.prompt_tokens)
        yield CounterMetricFamily("tokenmill_cached_prompt_tokens", "Of which found in the prefix cache",
                                  value=stats.cached_prompt_tokens)
        yield CounterMetricFamily("tokenmill_generation_tokens", "Tokens generated", value=stats.generated_tokens)
        yield CounterMetricFamily("tokenmill_thin_batch_seconds", "Step time with under half of max_num_seqs "
                                  "running and none waiting", value=stats.thin_batch_seconds)
        yield GaugeMetricFamily("tokenmill_requests_running", "Sequences running", value=metrics.sequences_running)
        yield GaugeMetricFamily("tokenmill_requests_waiting", "Sequences waiting", value=metrics.sequences_waiting)
        yield GaugeMetricFamily("tokenmill_kv_cache_usage_ratio", "Share of KV blocks in use",
                                value=metrics.kv_cache_usage)
        yield GaugeMetricFamily("tokenmill_prefix_cache_hit_rate", "Cached / all prompt tokens",
                                value=stats.prefix_cache_hit_rate)


class BatchCollector:
    """Each running batch's progress (the numbers its batch object shows), labelled by batch_id.
    A batch's series end when its job does: its final counts stay in its batch object."""

    def __init__(self, batches: BatchManager) -> None:
        self.batches = batches

    def collect(self) -> Iterator[Metric]:
        requests = GaugeMetricFamily("tokenmill_batch_requests", "A running batch's requests: total, completed, failed",
                                     labels=["batch_id", "state"])
        elapsed = GaugeMetricFamily("tokenmill_batch_elapsed_seconds", "Time a running batch's job has run",
                                    labels=["batch_id"])
        eta = GaugeMetricFamily("tokenmill_batch_eta_seconds", "A running batch's estimated time left, at its "
                                "current rate (absent before its first line is done)", labels=["batch_id"])
        speed = GaugeMetricFamily("tokenmill_batch_output_tokens_per_second", "A running batch's output tokens "
                                  "per second", labels=["batch_id"])
        hits = GaugeMetricFamily("tokenmill_batch_prefix_cache_hit_rate", "A running batch's cached / all prompt "
                                 "tokens", labels=["batch_id"])
        for batch in self.batches.running():
            batch_id, progress = batch["id"], batch["progress"]
            for state, count in batch["request_counts"].items():
                requests.add_metric([batch_id, state], count)
            elapsed.add_metric([batch_id], progress["elapsed_seconds"])
            if progress["eta_seconds"] is not None:
                eta.add_metric([batch_id], progress["eta_seconds"])
            speed.add_metric([batch_id], progress["output_tokens_per_second"])
            hits.add_metric([batch_id], progress["prefix_cache_hit_rate"])
        yield from (requests, elapsed, eta, speed, hits)


def metrics_registry(engine_thread: EngineThread, batches: BatchManager) -> tuple[CollectorRegistry,
                                                                                   LatencyHistograms]:
    """The server's registry, and its latency histograms (also handed to `batches`)."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine_thread.metrics))
    registry.register(BatchCollector(batches))
    latency = LatencyHistograms(registry)
    batches.latency = latency
    return registry, latency
