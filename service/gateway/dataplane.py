"""The data plane: runs a task pipeline for plain request data.

It knows nothing of gRPC or protobuf (convert.py translates), and nothing of torch.
Per request: resolve the model's spec (cached, from Triton) -> decode and preprocess
in a thread pool -> one Triton call per `max_batch_size` chunk, concurrently -> post-
process. Each stage is timed in metrics.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import metrics
from ..errors import FailedPrecondition, InvalidArgument, Unavailable
from ..imaging import Decoded, normalize
from ..pipelines.common import ImageInput, Task, Tensors, decode_image
from ..settings import Settings
from ..spec import ModelSpec
from .triton import ModelStatus, TritonModels


@dataclass(frozen=True)
class Answer:
    """A pipeline's results for every image, in request order."""

    model: str
    version: str
    results: list


class DataPlane:
    def __init__(self, settings: Settings, triton: TritonModels):
        self.settings = settings
        self.triton = triton
        self.triton_ready = False
        self._pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- shared steps
    async def resolve(self, model: str, version: str, tasks: Sequence[str]) -> ModelSpec:
        if not model:
            raise InvalidArgument("model", "a model name is required")
        if version and not version.isdigit():
            raise InvalidArgument("model_version", f"must be a version number, got {version!r}")
        if not self.triton_ready:
            raise Unavailable("the inference server is not ready")
        spec = await self.triton.spec(model, version)
        if spec.task not in tasks:
            raise FailedPrecondition(
                f"model {model!r} is a {spec.task} model; this method needs {' or '.join(tasks)}")
        return spec

    def check_images(self, images: Sequence[ImageInput]) -> None:
        if not images:
            raise InvalidArgument("images", "at least one image is required")
        limit = self.settings.max_images_per_request
        if len(images) > limit:
            raise InvalidArgument("images", f"{len(images)} images is over the limit of {limit} per request")
        # Before any model lookup or decoding: an oversized image costs nothing more.
        max_bytes = self.settings.max_image_bytes
        for i, image in enumerate(images):
            if image.encoded is not None and len(image.encoded) > max_bytes:
                raise InvalidArgument(f"images[{i}].encoded",
                                      f"{len(image.encoded)} bytes is over the limit of {max_bytes} bytes per image")

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def prepare(
        self, images: Sequence[ImageInput], spec: ModelSpec, task: Task, options,
    ) -> tuple[list[Decoded], list[Tensors]]:
        """Decode and preprocess every image off the event loop."""
        max_pixels = self.settings.max_image_pixels

        def work() -> tuple[list[Decoded], list[Tensors]]:
            with metrics.stage(spec.name, "decode"):
                decoded = [decode_image(image, i, max_pixels) for i, image in enumerate(images)]
            with metrics.stage(spec.name, "preprocess"):
                inputs = [task.preprocess(d, spec, options) for d in decoded]
            return decoded, inputs

        return await self._in_pool(work)

    def _model_inputs(self, spec: ModelSpec, inputs: Tensors) -> Tensors:
        image = spec.image_input
        batch = inputs[image.name]
        if not spec.normalize_in_model:
            batch = normalize(batch, spec.mean, spec.std).astype(image.dtype, copy=False)
        if spec.channel_order == "BGR":
            batch = np.ascontiguousarray(batch[:, ::-1])
        return {**inputs, image.name: batch}

    async def infer(
        self, spec: ModelSpec, version: str, per_image: list[Tensors], timeout_s: float | None
    ) -> tuple[list[Tensors], str]:
        """Run every image's items through the model and return each image's outputs.

        Items whose inputs have equal shapes are concatenated and sent in chunks of at
        most `max_batch_size` (variable-size models form one group per shape); all
        chunks run concurrently and the outputs are split back per image, in order.
        Arrays a pipeline's preprocess returned under names that are not model inputs
        (e.g. R-CNN's proposals) stay in the gateway and come back with that image's
        outputs, unchanged."""
        model_inputs = {t.name for t in spec.inputs}
        kept = [{k: v for k, v in t.items() if k not in model_inputs} for t in per_image]
        per_image = [{k: v for k, v in t.items() if k in model_inputs} for t in per_image]
        groups: dict[tuple, list[int]] = {}
        for i, tensors in enumerate(per_image):
            key = tuple((name, a.shape[1:], a.dtype.str) for name, a in sorted(tensors.items()))
            groups.setdefault(key, []).append(i)
        calls, plan = [], []  # plan: (group's image indices, item counts, first call, n calls)
        for members in groups.values():
            counts = [len(next(iter(per_image[i].values()))) for i in members]
            # A group of one image (the common request) is sent as it is, without a copy.
            joined = per_image[members[0]] if len(members) == 1 else {
                name: np.concatenate([per_image[i][name] for i in members]) for name in per_image[members[0]]}
            joined = self._model_inputs(spec, joined)
            total = sum(counts)
            step = spec.max_batch_size if spec.max_batch_size > 0 else total
            first = len(calls)
            for lo in range(0, total, step):
                chunk = {name: a[lo:lo + step] for name, a in joined.items()}
                calls.append(self.triton.infer(spec, version, chunk, timeout_s))
            plan.append((members, counts, first, len(calls) - first))
        with metrics.stage(spec.name, "infer"):
            answers = await asyncio.gather(*calls)
        results: list[Tensors] = [{} for _ in per_image]
        for members, counts, first, n in plan:
            part = answers[first:first + n]
            joined = {name: np.concatenate([out[name] for out, _ in part]) for name in part[0][0]}
            offsets = np.cumsum([0] + counts)
            for i, lo, hi in zip(members, offsets[:-1], offsets[1:]):
                results[i] = {**kept[i], **{name: a[lo:hi] for name, a in joined.items()}}
        return results, answers[0][1]

    async def run(
        self, task: Task, model: str, version: str, images: Sequence[ImageInput], request: dict,
        timeout_s: float | None,
    ) -> Answer:
        """One request of any task: resolve -> decode + preprocess -> infer -> postprocess."""
        self.check_images(images)
        spec = await self.resolve(model, version, task.tasks)
        options = task.options(request, spec)
        decoded, inputs = await self.prepare(images, spec, task, options)
        outputs, answered_version = await self.infer(spec, version, inputs, timeout_s)

        def post() -> list:
            with metrics.stage(spec.name, "postprocess"):
                return [task.postprocess(o, spec, d, options) for o, d in zip(outputs, decoded)]

        return Answer(spec.name, answered_version, await self._in_pool(post))

    # --- discovery
    async def list_models(self) -> list[tuple[ModelStatus, ModelSpec | None]]:
        out = []
        for status in await self.triton.models():
            spec = None
            if status.ready:
                try:
                    spec = await self.triton.spec(status.name)
                except Exception:  # a model without a convserve spec is still listed
                    spec = None
            out.append((status, spec))
        return out

    # --- streams
    # Frames in flight per stream, the one being answered included: bounds a stream's
    # memory and its share of the gateway.
    STREAM_WINDOW = 4

    async def stream(
        self, task: Task, frames: AsyncIterator[Frame], time_remaining: Callable[[], float | None],
    ) -> AsyncIterator[Answer]:
        """Run a stream's frames and yield their answers in frame order.

        Frames are pipelined: a reader task starts each frame as it arrives, so later
        frames decode and infer while earlier ones are answered; at most
        `STREAM_WINDOW` frames are in flight (a full window stops reading, so memory
        stays bounded). An error ends the stream at its frame, after the answers of the
        frames before it; InvalidArgument names the frame: ``frames[7].images[0].encoded``
        is image 0 of the stream's eighth frame (counting from 0). An error raised by
        `frames` itself (e.g. a token not allowed for a frame's model) ends the stream
        at that point. When the consumer stops (the call is cancelled), the reader and
        every frame still running are cancelled. `time_remaining()` is each frame's
        deadline, read as the frame starts."""
        started: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.STREAM_WINDOW)

        async def run_frame(frame: Frame, index: int) -> Answer:
            try:
                return await self.run(task, frame.model, frame.version, frame.images, frame.options,
                                      time_remaining())
            except InvalidArgument as exc:
                raise InvalidArgument(f"frames[{index}].{exc.field}", exc.description) from None

        async def read() -> None:
            index = 0
            try:
                async for frame in frames:
                    await slots.acquire()
                    started.put_nowait(asyncio.ensure_future(run_frame(frame, index)))
                    index += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the stream's source failed: answered in its turn
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                started.put_nowait(failed)
                return
            started.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (running := await started.get()) is not None:
                try:
                    yield await running
                finally:
                    slots.release()
        finally:
            reader.cancel()
            while not started.empty():
                _discard(started.get_nowait())


@dataclass(frozen=True)
class Frame:
    """One request of a stream, as plain data: what `DataPlane.run` takes."""

    model: str
    version: str
    images: Sequence[ImageInput]
    options: dict


def _discard(running: asyncio.Future | None) -> None:
    """Cancel a frame nobody will answer; a finished one's error is marked as seen."""
    if running is None:
        return
    if running.done():
        if not running.cancelled():
            running.exception()
    else:
        running.cancel()
