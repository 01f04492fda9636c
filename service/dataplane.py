"""The data plane: runs a task pipeline for plain request data.

It knows nothing of gRPC or protobuf (server.py translates), and nothing of torch.
Per request: resolve the model's spec (cached, from Triton) -> decode and preprocess
in a thread pool -> one Triton call per `max_batch_size` chunk, concurrently -> post-
process. Each stage is timed in metrics.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import metrics
from .errors import FailedPrecondition, InvalidArgument, Unavailable
from .imaging import Decoded, normalize
from .pipelines import classification
from .pipelines.common import ImageInput, decode_image
from .settings import Settings
from .spec import ModelSpec
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

    async def prepare(
        self,
        images: Sequence[ImageInput],
        spec: ModelSpec,
        preprocess: Callable[[Decoded, ModelSpec], np.ndarray],
    ) -> tuple[list[Decoded], np.ndarray]:
        """Decode and preprocess every image off the event loop; returns the decoded
        images and the stacked uint8 batch [N, 3, H, W]."""
        max_pixels = self.settings.max_image_pixels

        def work() -> tuple[list[Decoded], np.ndarray]:
            with metrics.stage(spec.name, "decode"):
                decoded = [decode_image(image, i, max_pixels) for i, image in enumerate(images)]
            with metrics.stage(spec.name, "preprocess"):
                batch = np.stack([preprocess(d, spec) for d in decoded])
            return decoded, batch

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, work)

    async def infer(
        self, spec: ModelSpec, version: str, batch: np.ndarray, timeout_s: float | None
    ) -> tuple[dict[str, np.ndarray], str]:
        """Run `batch` through the model in chunks of at most `max_batch_size`, all
        chunks concurrently; outputs are concatenated back in request order."""
        if not spec.normalize_in_model:
            batch = normalize(batch, spec.mean, spec.std).astype(spec.image_input.dtype, copy=False)
        if spec.channel_order == "BGR":
            batch = np.ascontiguousarray(batch[:, ::-1])
        step = spec.max_batch_size if spec.max_batch_size > 0 else len(batch)
        chunks = [batch[i:i + step] for i in range(0, len(batch), step)]
        with metrics.stage(spec.name, "infer"):
            answers = await asyncio.gather(*(
                self.triton.infer(spec, version, {spec.image_input.name: chunk}, timeout_s)
                for chunk in chunks))
        outputs = {
            name: np.concatenate([out[name] for out, _ in answers]) for name in answers[0][0]
        }
        return outputs, answers[0][1]

    # --- tasks
    async def classify(
        self, model: str, version: str, images: Sequence[ImageInput], top_k: int | None,
        timeout_s: float | None,
    ) -> Answer:
        self.check_images(images)
        spec = await self.resolve(model, version, ("classification",))
        k = classification.resolve_top_k(top_k, spec)
        _, batch = await self.prepare(images, spec, classification.preprocess)
        outputs, answered_version = await self.infer(spec, version, batch, timeout_s)
        with metrics.stage(spec.name, "postprocess"):
            results = classification.postprocess(outputs, spec, k)
        return Answer(spec.name, answered_version, results)

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
