"""The interceptor's error mapping, with a fake behaviour behind the real interceptor."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from helpers import free_port
from service.gateway.interceptors import ErrorInterceptor
from service._proto import vision_pb2, vision_pb2_grpc
from service.gateway.dataplane import DataPlane
from service.errors import FailedPrecondition, InvalidArgument
from service.settings import load_settings
from references import sample_spec


class FakeServicer(vision_pb2_grpc.VisionServicer):
    def __init__(self, error):
        self.error = error

    async def Classify(self, request, context):
        raise self.error


async def _call(error):
    port = free_port()
    server = grpc.aio.server(interceptors=[ErrorInterceptor(_NoTriton(), 8)])
    vision_pb2_grpc.add_VisionServicer_to_server(FakeServicer(error), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await vision_pb2_grpc.VisionStub(channel).Classify(vision_pb2.ClassifyRequest(model="m"), timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc
    finally:
        await server.stop(0)


class _NoTriton:
    def is_known(self, model):
        return False


def test_unexpected_exception_is_internal_without_traceback():
    error = asyncio.run(_call(RuntimeError("boom at /srv/secret/path.py line 3")))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error"
    assert "Traceback" not in error.details() and "/srv" not in error.details()


def test_invalid_argument_carries_bad_request_detail():
    error = asyncio.run(_call(InvalidArgument("images[2].encoded", "corrupt")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "images[2].encoded"


class _FakeTriton:
    def __init__(self, spec):
        self._spec = spec

    async def spec(self, model, version=""):
        return self._spec


def test_wrong_task_is_failed_precondition():
    plane = DataPlane(load_settings(), _FakeTriton(sample_spec(task="detection", labels=("a",),
                                                                outputs=sample_spec().outputs)))
    plane.triton_ready = True
    with pytest.raises(FailedPrecondition, match="detection model"):
        asyncio.run(plane.resolve("m", "", ("classification",)))
    error = asyncio.run(_call(FailedPrecondition("wrong task")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
