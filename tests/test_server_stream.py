"""DetectStream through the real interceptor: a stream is admitted before any message
names a model, so a model-scoped token is checked against every message."""
from __future__ import annotations

import asyncio

import grpc

from helpers import free_port
from service._proto import vision_pb2, vision_pb2_grpc
from service.server import Gateway
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
