"""`GET /metrics`: the server's state in Prometheus' text format (prometheus-client).

Requests by route and status; tokens in and out; time to first token and the gaps between a
stream's tokens (histograms, observed by the engine as it sends them); queue depth, rows decoding
and the KV cache rows in use; the prefix cache's entries, bytes, hits and tokens reused; and, when
the server runs with a receipt (as `slm serve` does), its energy and CO2 so far. Each app has its
own registry, so several servers in one process (tests) keep apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings",
          "/v1/responses"}
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, engine, footprint=None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("slm_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.ttft = Histogram("slm_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("slm_inter_token_latency_seconds", "Between a sequence's consecutive tokens",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.registry.register(_State(engine, footprint))

    def request(self, path: str, status: int) -> None:
        route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        self.requests.labels(route, str(status)).inc()

    # the engine thread's observations (prometheus-client's metrics are thread-safe)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _State:
    """What the engine (and the receipt) hold now, read at each scrape."""

    def __init__(self, engine, footprint):
        self.engine, self.footprint = engine, footprint

    def describe(self):
        return []

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("slm_running_sequences", "Sequences decoding (KV cache rows in use)",
                                value=s["running"])
        yield GaugeMetricFamily("slm_waiting_requests", "Prompts queued or going in", value=s["waiting"])
        yield GaugeMetricFamily("slm_kv_cache_rows", "KV cache rows (--max-batch)", value=s["max_batch"])
        yield GaugeMetricFamily("slm_kv_cache_usage_ratio", "Share of the KV cache rows in use",
                                value=s["running"] / s["max_batch"])
        yield CounterMetricFamily("slm_prompt_tokens", "Prompt tokens admitted", value=s["prompt_tokens"])
        yield CounterMetricFamily("slm_generation_tokens", "Tokens generated", value=s["generated_tokens"])
        p = s["prefix_cache"]
        yield GaugeMetricFamily("slm_prefix_cache_entries", "Sequences kept in the prefix cache", value=p["entries"])
        yield GaugeMetricFamily("slm_prefix_cache_bytes", "Bytes of keys and values the prefix cache keeps",
                                value=p["bytes"])
        yield CounterMetricFamily("slm_prefix_cache_hits", "Prompts that started with a kept sequence",
                                  value=p["hits"])
        yield CounterMetricFamily("slm_prefix_cache_misses", "Prompts that did not", value=p["misses"])
        yield CounterMetricFamily("slm_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache",
                                  value=p["hit_tokens"])
        if self.footprint is not None:
            f = self.footprint.so_far()
            yield CounterMetricFamily("slm_energy_kwh", "Energy since the server started (the receipt's method)",
                                      value=f["kwh"])
            yield CounterMetricFamily("slm_co2_grams", "CO2 since the server started (energy x PUE x grid)",
                                      value=f["co2_g"])
