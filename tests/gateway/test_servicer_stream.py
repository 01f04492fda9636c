"""DetectStream through the real interceptor: a stream is admitted before any message
names a model, so a model-scoped token is checked against every message."""
from __future__ import annotations

import asyncio

import grpc

from helpers import free_port
from service._proto import vision_pb2, vision_pb2_grpc
from service.gateway.dataplane import DataPlane
from service.gateway.server import Gateway
from service.settings import load_settings


async def _stream_code(address, metadata, models):
    async with grpc.aio.insecure_channel(address) as channel:
        frames = [vision_pb2.DetectRequest(model=m, images=[vision_pb2.Image(encoded=b"x")]) for m in models]
        call = vision_pb2_grpc.VisionStub(channel).DetectStream(iter(frames), timeout=5, metadata=metadata)
        try:
            async for _ in call:
                pass
            return "OK", ""
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details()


def test_scoped_token_is_checked_for_every_streamed_model(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("secret-scoped yolo\n")
    settings = load_settings(grpc_port=free_port(), metrics_port=0, triton_url="127.0.0.1:9",
                             auth_tokens_file=tokens)
    key = [("x-api-key", "secret-scoped")]

    async def main():
        gateway = Gateway(settings)
        await gateway.start()
        try:
            address = f"127.0.0.1:{gateway.port}"
            return (await _stream_code(address, key, ["resnet18"]),
                    await _stream_code(address, key, ["yolo"]),
                    await _stream_code(address, [], ["yolo"]))
        finally:
            await gateway.stop(0)

    other, allowed, anonymous = asyncio.run(main())
    assert other[0] == "PERMISSION_DENIED" and "resnet18" in other[1]
    # Authorized for yolo: the call goes on and meets the missing Triton.
    assert allowed == ("UNAVAILABLE", "the inference server is not ready")
    assert anonymous[0] == "UNAUTHENTICATED"


class _SlowFirstPlane(DataPlane):
    """A data plane whose answers take longer for earlier frames, so that pipelined
    frames finish out of order; frame images named "bad" fail with InvalidArgument.
    Only `run` is replaced: the real `DataPlane.stream` pipelines the frames."""

    def __init__(self):
        self.running = 0
        self.most_running = 0

    async def run(self, task, model, version, images, request, timeout_s):
        from service.gateway.dataplane import Answer
        from service.errors import InvalidArgument

        index = int(model)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(0.05 * (5 - index % 5))
        finally:
            self.running -= 1
        if images[0].encoded == b"bad":
            raise InvalidArgument("images[0].encoded", "corrupt")
        return Answer(model, str(index), [])


async def _serve_plane(plane, body):
    from service.gateway.interceptors import ErrorInterceptor
    from service.gateway.servicer import VisionServicer

    port = free_port()
    server = grpc.aio.server(interceptors=[ErrorInterceptor(_Known(), 8)])
    vision_pb2_grpc.add_VisionServicer_to_server(VisionServicer(plane), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await body(vision_pb2_grpc.VisionStub(channel))
    finally:
        await server.stop(0)


class _Known:
    def is_known(self, model):
        return True


def _frame(i, data=b"x"):
    return vision_pb2.DetectRequest(model=str(i), images=[vision_pb2.Image(encoded=data)])


def test_pipelined_frames_answer_in_request_order():
    plane = _SlowFirstPlane()

    async def all_at_once(stub):
        return [r.model_version async for r in stub.DetectStream(iter([_frame(i) for i in range(10)]), timeout=30)]

    assert asyncio.run(_serve_plane(plane, all_at_once)) == [str(i) for i in range(10)]
    # Frames overlapped, within the window.
    assert 1 < plane.most_running <= DataPlane.STREAM_WINDOW


def test_lockstep_client_does_not_deadlock():
    async def lockstep(stub):
        call = stub.DetectStream(timeout=30)
        got = []
        for i in range(4):
            await call.write(_frame(i))
            got.append((await call.read()).model_version)
        await call.done_writing()
        return got

    assert asyncio.run(_serve_plane(_SlowFirstPlane(), lockstep)) == ["0", "1", "2", "3"]


def test_bad_frame_ends_the_stream_after_the_earlier_answers():
    async def body(stub):
        frames = [_frame(0), _frame(1), _frame(2, b"bad"), _frame(3), _frame(4)]
        got = []
        try:
            async for r in stub.DetectStream(iter(frames), timeout=30):
                got.append(r.model_version)
        except grpc.aio.AioRpcError as exc:
            return got, exc.code(), exc.details()
        return got, None, ""

    got, code, details = asyncio.run(_serve_plane(_SlowFirstPlane(), body))
    assert got == ["0", "1"] and code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("frames[2].images[0].encoded")


class _StuckPlane(DataPlane):
    """Frame 0 answers at once; the others would take a minute unless cancelled."""

    def __init__(self):
        self.running = 0
        self.cancelled = 0

    async def run(self, task, model, version, images, request, timeout_s):
        from service.gateway.dataplane import Answer

        if model == "0":
            return Answer(model, "0", [])
        self.running += 1
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return Answer(model, model, [])


def test_cancelled_stream_cancels_its_frames():
    plane = _StuckPlane()

    async def body(stub):
        call = stub.DetectStream(iter([_frame(i) for i in range(8)]), timeout=30)
        assert (await call.read()).model_version == "0"
        for _ in range(100):  # let the window fill
            if plane.running >= 2:
                break
            await asyncio.sleep(0.02)
        call.cancel()
        for _ in range(200):  # the server notices the cancellation asynchronously
            if plane.running == 0:
                break
            await asyncio.sleep(0.02)
        return plane.running, plane.cancelled

    running, cancelled = asyncio.run(_serve_plane(plane, body))
    assert running == 0 and cancelled >= 2
