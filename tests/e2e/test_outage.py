"""Readiness follows a real Triton, here one of the tests' own (never the shared
stack's) with one small model: stop it, or kill -9 it under load, and the gateway turns
NOT_SERVING and fails fast with UNAVAILABLE; start it again on the same ports, and the
gateway recovers without a restart. Recovery times are measured and printed."""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import start_gateway
from helpers import encode, free_port, photo
from service._proto import vision_pb2, vision_pb2_grpc
from service.embedded import regions

pytestmark = pytest.mark.e2e

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A failed call must come back well before its 30 s deadline: a hang would run into it.
# Generous, so that only a hang (not a busy machine) fails the test.
FAIL_FAST_S = 5.0
RECOVERY_LIMIT_S = 60.0
LOAD_THREADS = 3


def _status(channel, service: str):
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2).status


def _wait_for(predicate, timeout_s: float, step: float = 0.05) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError(f"condition not met in {timeout_s}s")


@dataclass
class Outage:
    root: Path
    repo: Path
    ports: dict
    triton: object = None
    address: str = ""

    def launch(self) -> float:
        """Start Triton on the fixed ports; seconds until it is ready."""
        from service.embedded import start_triton

        start = time.monotonic()
        self.triton = start_triton(self.repo, log_path=self.root / "triton.log", state_dir=self.root / "state",
                                   **self.ports)
        self.triton.wait_ready(300)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    from service.export.repository import export_model

    root = tmp_path_factory.mktemp("outage")
    repo = root / "repo"
    export_model("resnet18", repo, input_size=64, max_batch_size=4, seed=3)
    setup = Outage(root, repo, dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()))
    setup.launch()
    port = free_port()
    gateway, _ = start_gateway(root, setup.ports["grpc_port"], port, 0, extra_env={"CONVSERVE_REFLECTION": "false"})
    setup.address = f"127.0.0.1:{port}"
    try:
        yield setup
    finally:
        gateway.terminate()
        gateway.wait(30)
        setup.triton.stop()


def _request():
    return vision_pb2.ClassifyRequest(
        model="resnet18", images=[vision_pb2.Image(encoded=encode(photo("chelsea.png"), "PNG"))])


def test_triton_stop_and_recovery(outage):
    request = _request()
    with grpc.insecure_channel(outage.address) as channel:
        vision = vision_pb2_grpc.VisionStub(channel)
        assert vision.Classify(request, timeout=30).results
        # Reflection was switched off for this gateway.
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
        with pytest.raises(grpc.RpcError):
            ProtoReflectionDescriptorDatabase(channel).get_services()

        outage.triton.stop()
        went_down = _wait_for(lambda: _status(channel, "") == NOT_SERVING, 10.0)
        assert _status(channel, "liveness") == SERVING
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            vision.Classify(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < FAIL_FAST_S

        outage.launch()
        recovered = _wait_for(lambda: _status(channel, "") == SERVING, RECOVERY_LIMIT_S)
        assert vision.Classify(request, timeout=30).results
        print(f"stop: readiness NOT_SERVING after {went_down:.2f}s; SERVING {recovered:.2f}s after Triton was ready")


def test_kill_9_under_load_and_recovery(outage):
    request = _request()
    calls: list[tuple[float, float, str]] = []  # (start, duration, code), from every load thread
    stop = threading.Event()

    def load():
        with grpc.insecure_channel(outage.address) as channel:
            vision = vision_pb2_grpc.VisionStub(channel)
            while not stop.is_set():
                start = time.monotonic()
                try:
                    vision.Classify(request, timeout=30)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                calls.append((start, time.monotonic() - start, code))
                if code != "OK":
                    time.sleep(0.02)  # a failing client retries, but not in a hot loop

    threads = [threading.Thread(target=load, daemon=True) for _ in range(LOAD_THREADS)]
    for thread in threads:
        thread.start()
    with grpc.insecure_channel(outage.address) as channel:
        try:
            _wait_for(lambda: sum(code == "OK" for _, _, code in calls) >= 5, 60)
            # The whole process group, as when a container is OOM-killed: tritonserver and its stubs.
            dead_regions = list(regions.SHM_DIR.glob(outage.triton.shm_prefix + "*"))
            assert dead_regions  # the stub's shared memory in /dev/shm
            killed_at = time.monotonic()
            os.killpg(outage.triton.process.pid, signal.SIGKILL)
            outage.triton.reap()  # as `convserve serve` does before it restarts Triton
            assert not any(path.exists() for path in dead_regions)
            went_down = _wait_for(lambda: _status(channel, "") == NOT_SERVING, 10.0)
            assert _status(channel, "liveness") == SERVING
            time.sleep(1.0)  # keep the load on the dead Triton for a while
            restarted_at = time.monotonic()
            triton_start = outage.launch()
            ready_at = time.monotonic()
            serving = _wait_for(lambda: _status(channel, "") == SERVING, RECOVERY_LIMIT_S)
            first_ok = _wait_for(lambda: any(code == "OK" and start >= ready_at for start, _, code in calls),
                                 RECOVERY_LIMIT_S)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
    down = [(start, duration, code) for start, duration, code in calls if killed_at <= start < restarted_at]
    codes = {}
    for _, _, code in calls:
        codes[code] = codes.get(code, 0) + 1
    print(f"kill -9: {len(calls)} calls {codes}; readiness NOT_SERVING after {went_down:.2f}s; "
          f"while down {len(down)} calls, slowest {max(d for _, d, _ in down) * 1000:.0f} ms; Triton restart "
          f"{triton_start:.1f}s, then gateway SERVING after {serving:.2f}s and first OK after {first_ok:.2f}s")
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert down and {code for _, _, code in down} == {"UNAVAILABLE"}
    # No hangs: calls in flight at the kill and calls made while Triton was down.
    failed = [duration for _, duration, code in calls if code != "OK"]
    assert max(failed) < FAIL_FAST_S, max(failed)
    assert serving < RECOVERY_LIMIT_S
