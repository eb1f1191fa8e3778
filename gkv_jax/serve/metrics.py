"""The server's Prometheus metrics (`/metrics`), one registry per app.

Gauges are read from the engine worker when scraped; counters and the latency histogram
are updated by the request handlers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]


class ServerMetrics:
    """What /metrics reports (every name starts with `gkv_`)."""

    def __init__(self, slots: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gkv_requests", "HTTP requests answered, by endpoint and "
                                "status code", ["endpoint", "status"], registry=r)
        self.latency = Histogram("gkv_request_seconds", "time from a request's arrival to "
                                 "its last byte, answered requests", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                                          300), registry=r)
        self.queued = Gauge("gkv_queue_length", "samples accepted and waiting for a slot",
                            registry=r)
        self.running = Gauge("gkv_running", "samples accepted and not finished (waiting or "
                             "in a slot)", registry=r)
        self.busy = Gauge("gkv_slots_busy", "slots decoding a request now", registry=r)
        self.slots = Gauge("gkv_slots", "slots of the engine (fixed at start)", registry=r)
        self.slots.set(slots)
        self.occupancy = Gauge("gkv_slot_occupancy", "share of slot-steps that produced a "
                               "request's token, since start", registry=r)
        self.tokens_per_second = Gauge("gkv_tokens_per_second", "generated tokens per "
                                       "second over the last 10 s", registry=r)
        self.generated = Gauge("gkv_generated_tokens_total", "tokens generated since start",
                               registry=r)
        self.finished = Gauge("gkv_samples_finished_total", "samples finished since start, "
                              "by the engine's reason (eos, length, cancelled)", ["reason"],
                              registry=r)

    def render(self, stats: dict) -> bytes:
        """The exposition text, the gauges refreshed from the worker's `stats()`."""
        self.running.set(stats["running"])
        self.busy.set(stats["busy_slots"])
        self.queued.set(max(0, stats["running"] - stats["busy_slots"]))
        self.occupancy.set(stats["occupancy"])
        self.tokens_per_second.set(stats["tokens_per_second"])
        self.generated.set(stats["generated_tokens"])
        for reason in ("eos", "length", "cancelled"):
            self.finished.labels(reason).set(stats["finished"].get(reason, 0))
        return generate_latest(self.registry)
