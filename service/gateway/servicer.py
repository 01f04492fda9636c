"""The Vision servicer: one short method per RPC.

Each method only translates: proto -> plain data (convert) -> data plane -> proto. No
method catches anything; the interceptor maps every domain error to its status code.
"""
from __future__ import annotations

import asyncio

from .._proto import vision_pb2_grpc
from ..errors import InvalidArgument, NotFound
from ..pipelines import classification, detection, generation, segmentation
from . import convert
from .dataplane import DataPlane

# DetectStream: frames in flight per stream, the one being answered included (bounds a
# stream's memory and its share of the gateway).
STREAM_WINDOW = 4


def _discard(task: asyncio.Future | None) -> None:
    """Cancel a frame nobody will answer; a finished one's error is marked as seen."""
    if task is None:
        return
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()


class VisionServicer(vision_pb2_grpc.VisionServicer):
    """Translates between messages and the data plane; no logic of its own."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def Classify(self, request, context):
        answer = await self.plane.run(
            classification.TASK, request.model, request.model_version, convert.images_from_proto(request.images),
            convert.classify_options(request), context.time_remaining())
        return convert.classify_response(answer)

    async def Detect(self, request, context):
        answer = await self.plane.run(
            detection.TASK, request.model, request.model_version, convert.images_from_proto(request.images),
            convert.detect_options(request), context.time_remaining())
        return convert.detect_response(answer)

    async def DetectStream(self, request_iterator, context):
        """Each request is one frame (or several images), answered in request order.

        Frames are pipelined: a reader task starts each frame as it arrives, so later
        frames decode and infer while earlier ones are answered; at most `STREAM_WINDOW`
        frames are in flight (a full window stops reading, so memory stays bounded).
        Answers still leave in request order. An error ends the stream at its frame,
        after the answers of the frames before it; INVALID_ARGUMENT names the frame:
        ``frames[7].images[0].encoded`` is image 0 of the stream's eighth request
        (counting from 0)."""
        started: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_WINDOW)

        async def read() -> None:
            frame = 0
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    started.put_nowait(asyncio.ensure_future(self._detect_frame(request, frame, context)))
                    frame += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. a token not allowed for this frame's model
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                started.put_nowait(failed)
                return
            started.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await started.get()) is not None:
                try:
                    yield await task
                finally:
                    slots.release()
        finally:
            reader.cancel()
            while not started.empty():
                _discard(started.get_nowait())

    async def _detect_frame(self, request, frame: int, context):
        try:
            answer = await self.plane.run(
                detection.TASK, request.model, request.model_version, convert.images_from_proto(request.images),
                convert.detect_options(request), context.time_remaining())
        except InvalidArgument as exc:
            raise InvalidArgument(f"frames[{frame}].{exc.field}", exc.description) from None
        return convert.detect_response(answer)

    async def Segment(self, request, context):
        answer = await self.plane.run(
            segmentation.TASK, request.model, request.model_version, convert.images_from_proto(request.images),
            convert.segment_options(request), context.time_remaining())
        return convert.segment_response(answer)

    async def Generate(self, request, context):
        answer = await self.plane.run(
            generation.TASK, request.model, request.model_version, convert.images_from_proto(request.images),
            convert.generate_options(request), context.time_remaining())
        generation.check_answer_size(answer.results, self.plane.settings.max_receive_message_bytes)
        return convert.generate_response(answer)

    async def ListModels(self, request, context):
        return convert.list_models_response(await self.plane.list_models())

    async def GetModel(self, request, context):
        if not request.name:
            raise InvalidArgument("name", "a model name is required")
        for status, spec in await self.plane.list_models():
            if status.name == request.name:
                return convert.model_info(status, spec)
        raise NotFound(f"unknown model {request.name!r}")
