"""Graceful shutdown of `convserve serve` under load: SIGTERM while at least 200 calls
are in flight. The gateway turns NOT_SERVING, refuses new calls with UNAVAILABLE, lets
every call in flight finish, and only then is Triton stopped."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import _wait_serving
from helpers import encode, free_port, photo
from service._proto import vision_pb2, vision_pb2_grpc

pytestmark = pytest.mark.e2e

CALLS = 260
MIN_IN_FLIGHT = 200
# Slow enough that draining CALLS takes seconds: 16 images per 0.5 s forward.
SLOW_SECONDS = 0.5
SLOW_BATCH = 16


def _in_flight(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith('convserve_requests_in_flight{method="Classify"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory) -> Path:
    from slow_model import export_slow_model

    repo = tmp_path_factory.mktemp("shutdown") / "repo"
    # Unbounded queue: every call waits its turn instead of being refused.
    export_slow_model(repo, seconds=SLOW_SECONDS, max_queue_size=0, max_batch_size=SLOW_BATCH)
    return repo


def test_sigterm_drains_every_call_in_flight_then_stops_triton(slow_repo, tmp_path):
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ)
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "CONVSERVE_MAX_IN_FLIGHT": "1000",
        "CONVSERVE_DRAIN_GRACE_S": "90",
        "CONVSERVE_HEALTH_POLL_S": "0.2",
        "CONVSERVE_TRITON_LOG": str(tmp_path / "triton.log"),
    })
    output = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--repo", str(slow_repo), "--port", str(port),
         "--metrics-port", str(metrics_port), "--http-port", str(free_port()),
         "--triton-grpc-port", str(free_port()), "--triton-metrics-port", str(free_port())],
        cwd=tmp_path, env=env, stdout=open(output, "wb"), stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        _wait_serving(address, 300, serve, output)
        result = asyncio.run(_drain_under_load(address, metrics_port, serve.pid))
        assert serve.wait(120) == 0, output.read_text()[-3000:]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    log = output.read_text()
    in_flight_at_sigterm, pending_at_sigterm, codes, refused, health_after = result
    # The gateway's own count of calls in flight when it began draining: exactly these
    # must complete. Calls the client had not yet delivered by then are new calls, and
    # new calls are refused with UNAVAILABLE.
    draining = next(json.loads(line) for line in log.splitlines() if '"gateway draining"' in line)
    print(f"in flight at SIGTERM: gateway {draining['in_flight']} (gauge {in_flight_at_sigterm:.0f}), "
          f"client-side pending {pending_at_sigterm}; codes {codes}")
    assert draining["in_flight"] >= MIN_IN_FLIGHT
    assert codes.get("OK", 0) == draining["in_flight"], codes  # 0 of those in flight failed
    assert set(codes) <= {"OK", "UNAVAILABLE"} and sum(codes.values()) == CALLS, codes
    assert health_after == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refused[0] == "UNAVAILABLE" and "shutting down" in refused[1], refused
    # Order in the process's output: drained, gateway stopped, then Triton stopped.
    marks = ['"gateway draining"', '"gateway drained"', '"gateway stopped"', "triton stopped (exit code 0)"]
    positions = [log.find(mark) for mark in marks]
    assert -1 not in positions and positions == sorted(positions), (positions, log[-3000:])


async def _drain_under_load(address: str, metrics_port: int, pid: int):
    tiny = vision_pb2.Image(encoded=encode(photo("chelsea.png", max_side=32), "PNG"))
    request = vision_pb2.ClassifyRequest(model="slow", images=[tiny])
    # Several connections, as several clients would have.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(4)]
    try:
        stubs = [vision_pb2_grpc.VisionStub(c) for c in channels]

        async def call(i: int) -> str:
            try:
                await stubs[i % len(stubs)].Classify(request, timeout=300)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        tasks = [asyncio.create_task(call(i)) for i in range(CALLS)]
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 60
        while True:
            in_flight = await loop.run_in_executor(None, _in_flight, metrics_port)
            if in_flight >= MIN_IN_FLIGHT:
                break
            assert time.monotonic() < deadline, f"only {in_flight} calls in flight"
            await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        pending = sum(not t.done() for t in tasks)

        health = health_pb2_grpc.HealthStub(channels[0])
        status = None
        for _ in range(100):
            status = (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        try:
            await stubs[1].Classify(request, timeout=30)
            refused = ("OK", "")
        except grpc.aio.AioRpcError as exc:
            refused = (exc.code().name, exc.details())
        codes: dict[str, int] = {}
        for code in await asyncio.gather(*tasks):
            codes[code] = codes.get(code, 0) + 1
        return in_flight, pending, codes, refused, status
    finally:
        for channel in channels:
            await channel.close()
