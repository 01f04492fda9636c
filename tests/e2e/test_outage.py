"""Readiness follows a real Triton: stop it, and the gateway turns NOT_SERVING and
fails fast; start it again, and the gateway recovers without a restart."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import start_gateway
from helpers import encode, free_port, photo
from service._proto import vision_pb2, vision_pb2_grpc

pytestmark = pytest.mark.e2e


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


def test_triton_stop_and_recovery(stack, tmp_path):
    from service.embedded import start_triton

    ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())

    def launch():
        triton = start_triton(stack.repo, log_path=tmp_path / "triton.log", state_dir=tmp_path / "state", **ports)
        triton.wait_ready(300)
        return triton

    triton = launch()
    gateway, _ = start_gateway(tmp_path, ports["grpc_port"], free_port(), 0,
                               extra_env={"CONVSERVE_REFLECTION": "false"})
    address = f"127.0.0.1:{gateway.args[gateway.args.index('--port') + 1]}"
    request = vision_pb2.ClassifyRequest(
        model="resnet18", images=[vision_pb2.Image(encoded=encode(photo("chelsea.png"), "PNG"))])
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        with grpc.insecure_channel(address) as channel:
            vision = vision_pb2_grpc.VisionStub(channel)
            assert vision.Classify(request, timeout=30).results
            # Reflection was switched off for this gateway.
            from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
                ProtoReflectionDescriptorDatabase
            with pytest.raises(grpc.RpcError):
                ProtoReflectionDescriptorDatabase(channel).get_services()

            triton.stop()
            went_down = _wait_for(lambda: _status(channel, "") == not_serving, 2.0)
            assert _status(channel, "liveness") == serving
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                vision.Classify(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - start < 1.0  # fails fast, no hang

            triton = launch()
            recovered = _wait_for(lambda: _status(channel, "") == serving, 10.0)
            assert vision.Classify(request, timeout=30).results
            print(f"readiness NOT_SERVING after {went_down:.2f}s; SERVING {recovered:.2f}s after Triton was ready")
    finally:
        gateway.terminate()
        gateway.wait(30)
        triton.stop()
