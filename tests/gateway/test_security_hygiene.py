"""What the gateway gives away: no tracebacks or internal paths in error messages, even
when a model answers garbage, and no tokens in any log line. The real interceptor,
servicer and data plane run on a real port; only Triton is replaced, by one that
answers garbage (the real-Triton path of errors is covered by the e2e tests)."""
from __future__ import annotations

import asyncio
import logging
import re

import grpc
import numpy as np
import pytest

from helpers import encode, free_port, photo
from service.gateway.interceptors import ErrorInterceptor
from service.gateway.servicer import VisionServicer
from service._proto import vision_pb2, vision_pb2_grpc
from service.gateway.dataplane import DataPlane
from service.gateway.logs import JsonFormatter
from service.gateway.server import Gateway
from service.settings import load_settings
from references import sample_spec

LEAKS = re.compile(r"Traceback|File \"|\.py\b|/work/|/site-packages/|/usr/|garbage-value|Error\b")


class GarbageTriton:
    """A Triton whose model answers garbage of one kind."""

    def __init__(self, kind: str):
        self.kind = kind
        self.spec_ = sample_spec(resize_mode="stretch", inputs=sample_spec().inputs)

    def is_known(self, model):
        return True

    async def spec(self, model, version=""):
        return self.spec_

    async def infer(self, spec, version, inputs, timeout_s):
        n = len(next(iter(inputs.values())))
        name = spec.outputs[0].name
        outputs = {
            "strings": {name: np.full((n, 3), "garbage-value", dtype=object)},
            "no_rows": {name: np.zeros((0, 3), np.float32)},
            "wrong_name": {"not_" + name: np.zeros((n, 3), np.float32)},
        }[self.kind]
        return outputs, "1"


async def _classify_against(triton) -> grpc.aio.AioRpcError:
    port = free_port()
    plane = DataPlane(load_settings(), triton)
    plane.triton_ready = True
    server = grpc.aio.server(interceptors=[ErrorInterceptor(triton, 8)])
    vision_pb2_grpc.add_VisionServicer_to_server(VisionServicer(plane), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    image = vision_pb2.Image(encoded=encode(photo("chelsea.png", max_side=64), "PNG"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await vision_pb2_grpc.VisionStub(channel).Classify(
                    vision_pb2.ClassifyRequest(model="m", images=[image]), timeout=30,
                    metadata=[("x-request-id", "garbage-1")])
            return info.value
    finally:
        await server.stop(0)
        plane.close()


@pytest.mark.parametrize("kind", ["strings", "no_rows", "wrong_name"])
def test_garbage_from_the_model_is_internal_without_internals(kind, caplog):
    with caplog.at_level(logging.ERROR, logger="convserve.gateway"):
        error = asyncio.run(_classify_against(GarbageTriton(kind)))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error"
    assert not LEAKS.search(error.details())
    assert not LEAKS.search(repr(error.trailing_metadata()))
    # The operator still gets the traceback, tied to the request, in the gateway's log.
    logged = [r for r in caplog.records if getattr(r, "request_id", "") == "garbage-1"]
    assert logged and logged[0].exc_info is not None


def test_tokens_never_logged(tmp_path, caplog):
    secrets = ("tok-admin-9f8e7d", "tok-scoped-1a2b3c", "tok-unknown-4d5e6f")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{secrets[0]}\n{secrets[1]} other_model\n")
    settings = load_settings(grpc_port=free_port(), metrics_port=0, triton_url="127.0.0.1:9",
                             auth_tokens_file=tokens)

    async def run():
        gateway = Gateway(settings)
        await gateway.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = vision_pb2_grpc.VisionStub(channel)
                request = vision_pb2.ClassifyRequest(model="m", images=[vision_pb2.Image(encoded=b"x")])
                codes = []
                for metadata in ([("authorization", f"Bearer {secrets[0]}")], [("x-api-key", secrets[1])],
                                 [("authorization", f"Bearer {secrets[2]}")], [("x-api-key", secrets[0])]):
                    try:
                        await stub.Classify(request, timeout=5, metadata=metadata)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code().name)
                return codes
        finally:
            await gateway.stop(0)

    with caplog.at_level(logging.DEBUG):
        codes = asyncio.run(run())
    assert codes == ["UNAVAILABLE", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE"]
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert sum('"convserve.access"' in line for line in lines) == 4  # one access line per call
    for line in lines:
        assert not any(secret in line for secret in secrets), line
