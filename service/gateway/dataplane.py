"""The data plane: runs a task pipeline for plain request data.

It knows nothing of gRPC or protobuf (convert.py translates), and nothing of torch.
Per request: resolve the model's spec (cached, from Triton; its options parsed once)
-> decode and preprocess in a thread pool (the task's preprocess returns the model's
tensors, normalized and channel-ordered, plus a per-image context) -> the batching
plan's Triton calls, concurrently -> postprocess with each image's context. Each stage
is timed in metrics.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import metrics
from ..errors import FailedPrecondition, InvalidArgument, Unavailable
from ..pipelines import layouts
from ..pipelines.common import Context, ImageInput, Task, Tensors, decode_image, set_stage_timer
from ..settings import Settings
from ..spec import ModelSpec
from .triton import ModelStatus, TritonModels


@dataclass(frozen=True)
class Answer:
    """A pipeline's results for every image, in request order."""

    model: str
    version: str
    results: list


# Pipelines time their inner steps (R-CNN's selective search) through this hook.
set_stage_timer(metrics.stage)


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
        try:
            spec.settings  # parsed once per cached spec
        except (layouts.BadModelOption, layouts.LayoutError) as exc:
            raise FailedPrecondition(f"model {model!r}: {exc}") from None
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

    async def _in_pool(self, model: str, fn):
        """Run `fn()` in the preprocessing pool; the time it waits there for a thread is
        stage `pool_wait` (how saturated the pool is)."""
        queued = time.perf_counter()

        def timed_fn():
            metrics.observe_stage(model, "pool_wait", time.perf_counter() - queued)
            return fn()

        return await asyncio.get_running_loop().run_in_executor(self._pool, timed_fn)

    async def prepare(
        self, images: Sequence[ImageInput], spec: ModelSpec, task: Task, options,
    ) -> list[tuple[Tensors, Context]]:
        """Decode and preprocess every image off the event loop: each image's model
        inputs (ready to send) and its context for postprocess."""
        max_pixels = self.settings.max_image_pixels

        def work() -> list[tuple[Tensors, Context]]:
            with metrics.stage(spec.name, "decode"):
                decoded = [decode_image(image, i, max_pixels) for i, image in enumerate(images)]
            with metrics.stage(spec.name, "preprocess"):
                return [task.preprocess(d, spec, options) for d in decoded]

        return await self._in_pool(spec.name, work)

    async def infer(
        self, spec: ModelSpec, version: str, per_image: list[Tensors], timeout_s: float | None
    ) -> tuple[list[Tensors], str]:
        """Run every image's items through the model and return each image's outputs.

        The batching plan is `batch_plan`, in calls of at most `spec.items_per_call`
        items: one item per call for a model whose batch axis is fixed at 1 (each
        call's leading axis of 1 is then the batch in the model's dims). All calls run
        concurrently and the outputs are split back per image, in order."""
        counts = [len(next(iter(t.values()))) for t in per_image]
        batches = batch_plan(counts, [_shape_key(t) for t in per_image], spec.items_per_call)
        calls = []
        for batch in batches:
            # A call of one image's items (the common request) is sent as it is, without a copy.
            if len(batch.parts) == 1:
                i, lo, hi = batch.parts[0]
                tensors = per_image[i] if (lo, hi) == (0, counts[i]) else \
                    {name: a[lo:hi] for name, a in per_image[i].items()}
            else:
                tensors = {name: np.concatenate([per_image[i][name][lo:hi] for i, lo, hi in batch.parts])
                           for name in per_image[batch.parts[0][0]]}
            calls.append(self.triton.infer(spec, version, tensors, timeout_s))
        with metrics.stage(spec.name, "infer"):
            answers = await asyncio.gather(*calls)
        pieces: list[list[Tensors]] = [[] for _ in per_image]
        for batch, (outputs, _) in zip(batches, answers):
            at = 0
            for i, lo, hi in batch.parts:
                pieces[i].append({name: a[at:at + hi - lo] for name, a in outputs.items()})
                at += hi - lo
        # An image without items (none of its proposals) gets empty outputs.
        empty = {name: a[:0] for name, a in answers[0][0].items()}
        results = [empty if not parts else parts[0] if len(parts) == 1 else
                   {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} for parts in pieces]
        return results, answers[0][1]

    async def run(
        self, task: Task, model: str, version: str, images: Sequence[ImageInput], request: dict,
        timeout_s: float | None,
    ) -> Answer:
        """One request of any task: resolve -> decode + preprocess -> infer -> postprocess."""
        self.check_images(images)
        spec = await self.resolve(model, version, task.tasks)
        options = task.options(request, spec)
        prepared = await self.prepare(images, spec, task, options)
        outputs, answered_version = await self.infer(spec, version, [t for t, _ in prepared], timeout_s)

        def post() -> list:
            with metrics.stage(spec.name, "postprocess"):
                return [task.postprocess(o, c, spec, options) for o, (_, c) in zip(outputs, prepared)]

        return Answer(spec.name, answered_version, await self._in_pool(spec.name, post))

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

# ------------------------------------------------------------------- batching plan
@dataclass(frozen=True)
class Batch:
    """One Triton call: ``parts`` are (image index, first item, end item) slices of the
    images' items, concatenated in this order."""

    parts: tuple[tuple[int, int, int], ...]


def _shape_key(tensors: Tensors) -> tuple:
    return tuple((name, a.shape[1:], a.dtype.str) for name, a in sorted(tensors.items()))


def batch_plan(counts: Sequence[int], shapes: Sequence, items_per_call: int) -> list[Batch]:
    """How the items of several images go to Triton: images whose inputs have equal
    per-item shapes (`shapes`, any hashable key) form a group, in order of first
    appearance; a group's items (image i has `counts[i]`) are concatenated in image
    order and cut into calls of at most `items_per_call` items (1 for a model whose
    batch axis is fixed at 1: one call per item)."""
    if items_per_call < 1:
        raise ValueError(f"items_per_call must be at least 1, got {items_per_call}")
    groups: dict = {}
    for i, key in enumerate(shapes):
        groups.setdefault(key, []).append(i)
    batches = []
    for members in groups.values():
        parts, room = [], items_per_call
        for i in members:
            lo = 0
            while lo < counts[i]:
                take = min(room, counts[i] - lo)
                parts.append((i, lo, lo + take))
                lo += take
                room -= take
                if room == 0:
                    batches.append(Batch(tuple(parts)))
                    parts, room = [], items_per_call
        if parts:
            batches.append(Batch(tuple(parts)))
    return batches
