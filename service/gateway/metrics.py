"""Every Prometheus metric of the gateway, in one place.

Labels are limited to method, model, stage and code. A model name the gateway does not
know is labelled `unknown`, so clients cannot blow up the label cardinality.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# 1 ms .. 30 s: from a cached tiny model to a large batch on CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0)
# 1 KiB .. 64 MiB, the default receive limit.
BYTES_BUCKETS = tuple(1024 * 4 ** i for i in range(9)) + (64 * 1024 * 1024,)
UNKNOWN_MODEL = "unknown"

REQUESTS = Counter(
    "convserve_requests", "gRPC requests answered, by method, model and status code.",
    ["method", "model", "code"])
LATENCY = Histogram(
    "convserve_request_duration_seconds", "Total time to answer a request.",
    ["method", "model"], buckets=LATENCY_BUCKETS)
STAGE_LATENCY = Histogram(
    "convserve_stage_duration_seconds",
    "Time spent per request in each pipeline stage (decode, preprocess, infer, postprocess; "
    "pool_wait: waiting for a preprocessing thread, observed at each of a request's two "
    "hand-offs (before decode, before postprocess); proposals: R-CNN/Fast R-CNN selective "
    "search, per image, inside preprocess).",
    ["model", "stage"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("convserve_requests_in_flight", "Requests being handled now.", ["method"])
REQUEST_BYTES = Histogram(
    "convserve_request_bytes", "Size of the serialized request message.",
    ["method"], buckets=BYTES_BUCKETS)
IMAGES = Counter("convserve_images", "Images processed, by method and model.", ["method", "model"])
TRITON_READY = Gauge("convserve_triton_ready", "1 while Triton reports ready, else 0.")


def observe_stage(model: str, name: str, seconds: float) -> None:
    """Record `seconds` as pipeline stage `name` of `model`."""
    STAGE_LATENCY.labels(model, name).observe(seconds)


@contextmanager
def stage(model: str, name: str):
    """Time a block as pipeline stage `name` of `model`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_LATENCY.labels(model, name).observe(time.perf_counter() - start)


def start_exporter(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` (0 disables it)."""
    if port:
        start_http_server(port, addr=addr)
