"""Overload at 3x capacity, through a real gateway with a small in-flight limit in
front of the stack's Triton and its slow model (0.5 s per call, max batch 1, Triton
queue 1): accepted calls succeed (or meet Triton's full queue), the rest are refused
at once with RESOURCE_EXHAUSTED, memory stays bounded and the gauge returns to 0."""
from __future__ import annotations

import threading
from statistics import median
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conftest import start_gateway
from helpers import encode, free_port, photo
from memory import MIB, rss_bytes
from service._proto import vision_pb2, vision_pb2_grpc

pytestmark = pytest.mark.e2e

CAPACITY = 4
CALLS = 3 * CAPACITY
WAVES = 4
RSS_GROWTH_LIMIT = 50 * MIB
GATEWAY_REFUSAL = "calls in flight"   # the gateway's own RESOURCE_EXHAUSTED message
TRITON_QUEUE_FULL = "queue is full"   # Triton's queue-full, mapped to the same code


def _metric(port: int, prefix: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def small_gateway(stack):
    port, metrics_port = free_port(), free_port()
    process, log = start_gateway(stack.workdir, stack.triton_grpc_port, port, metrics_port,
                                 extra_env={"CONVSERVE_MAX_IN_FLIGHT": str(CAPACITY)})
    yield process, f"127.0.0.1:{port}", metrics_port
    process.terminate()
    process.wait(30)


def test_three_times_capacity(small_gateway):
    process, address, metrics_port = small_gateway
    # A real photo at 320 px: decoding it is part of what each accepted call holds.
    image = vision_pb2.Image(encoded=encode(photo("astronaut.png"), "JPEG", quality=90))
    request = vision_pb2.ClassifyRequest(model="slow", images=[image])
    with grpc.insecure_channel(address) as channel:
        vision = vision_pb2_grpc.VisionStub(channel)

        def once():
            start = time.perf_counter()
            try:
                vision.Classify(request, timeout=120)
                return "OK", "", time.perf_counter() - start
            except grpc.RpcError as error:
                return error.code().name, error.details(), time.perf_counter() - start

        # Earlier tests may have left slow calls in Triton: start on an idle model.
        deadline = time.monotonic() + 60
        while once()[0] != "OK":
            assert time.monotonic() < deadline, "the slow model never became idle"
        rss_before = rss_bytes(process.pid)

        results = []
        for _ in range(WAVES):
            barrier = threading.Barrier(CALLS)

            def fire(_):
                barrier.wait()
                return once()

            with ThreadPoolExecutor(CALLS) as pool:
                results += list(pool.map(fire, range(CALLS)))
        rss_after = rss_bytes(process.pid)

    codes = {code for code, _, _ in results}
    assert codes <= {"OK", "RESOURCE_EXHAUSTED"}, results
    ok = [t for code, _, t in results if code == "OK"]
    refused = [t for code, msg, t in results if code == "RESOURCE_EXHAUSTED" and GATEWAY_REFUSAL in msg]
    queue_full = [t for code, msg, t in results if code == "RESOURCE_EXHAUSTED" and TRITON_QUEUE_FULL in msg]
    assert len(ok) + len(refused) + len(queue_full) == len(results), results
    assert len(ok) >= WAVES and len(refused) >= WAVES * (CALLS - 2 * CAPACITY)
    print(f"{len(results)} calls: {len(ok)} OK (median {median(ok) * 1000:.0f} ms), "
          f"{len(refused)} refused by the gateway (median {median(refused) * 1000:.1f} ms, "
          f"max {max(refused) * 1000:.1f} ms), {len(queue_full)} Triton queue full; "
          f"gateway RSS {rss_before / MIB:.1f} -> {rss_after / MIB:.1f} MB")
    # Refusals do not wait for the model: far below the time an accepted call takes
    # (medians, measured in the same run: on a busy machine both slow down together).
    assert median(refused) < 0.25 * median(ok), (median(refused), median(ok))
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
    deadline = time.monotonic() + 10
    while _metric(metrics_port, 'convserve_requests_in_flight{method="Classify"}') != 0:
        assert time.monotonic() < deadline, "calls still counted in flight"
        time.sleep(0.1)
