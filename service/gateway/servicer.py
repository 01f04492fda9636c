"""The Vision servicer: one short method per RPC.

Each method only translates: proto -> plain data (convert) -> data plane -> proto. No
method catches anything; the interceptor maps every domain error to its status code.
"""
from __future__ import annotations

from contextlib import aclosing

from .._proto import vision_pb2_grpc
from ..errors import InvalidArgument
from ..pipelines import classification, detection, generation, segmentation
from . import convert
from .dataplane import DataPlane
from .triton import unknown_model


class VisionServicer(vision_pb2_grpc.VisionServicer):
    """Translates between messages and the data plane; no logic of its own."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def _run(self, task, request, options: dict, context):
        """One request of any task through the data plane, within the call's deadline."""
        return await self.plane.run(task, request.model, request.model_version,
                                    convert.images_from_proto(request.images), options, context.time_remaining())

    async def Classify(self, request, context):
        return convert.classify_response(await self._run(classification.TASK, request, convert.classify_options(request), context))

    async def Detect(self, request, context):
        return convert.detect_response(await self._run(detection.TASK, request, convert.detect_options(request), context))

    async def DetectStream(self, request_iterator, context):
        """Each request is one frame, answered in request order (`DataPlane.stream`)."""
        frames = (convert.detect_frame(request) async for request in request_iterator)
        async with aclosing(self.plane.stream(detection.TASK, frames, context.time_remaining)) as answers:
            async for answer in answers:
                yield convert.detect_response(answer)

    async def Segment(self, request, context):
        return convert.segment_response(await self._run(segmentation.TASK, request, convert.segment_options(request), context))

    async def Generate(self, request, context):
        answer = await self._run(generation.TASK, request, convert.generate_options(request), context)
        generation.check_answer_size(answer.results, self.plane.settings.max_receive_message_bytes)
        return convert.generate_response(answer)

    async def ListModels(self, request, context):
        return convert.list_models_response(await self.plane.list_models())

    async def GetModel(self, request, context):
        if not request.name:
            raise InvalidArgument("name", "a model name is required")
        models = await self.plane.list_models()
        for status, spec in models:
            if status.name == request.name:
                return convert.model_info(status, spec)
        raise unknown_model(request.name, [status.name for status, _ in models if status.ready])
