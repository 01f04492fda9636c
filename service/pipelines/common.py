"""What every task pipeline shares: plain request data (no protobuf, no gRPC) and the
`Task` interface the data plane runs.

A task turns one decoded image into model inputs and the model's outputs for that image
back into a result. The data plane does everything in between, the same way for every
task: decoding in threads, grouping items of equal shape into Triton batches of at most
`max_batch_size`, running the chunks concurrently, and splitting outputs back per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from ..imaging import Decoded, decode_encoded, decode_raw
from ..spec import ModelSpec


@dataclass(frozen=True)
class ImageInput:
    """One request image: `encoded` bytes, or `raw` uint8 HWC RGB pixels with their size."""

    encoded: bytes | None = None
    raw: bytes | None = None
    height: int = 0
    width: int = 0


def decode_image(image: ImageInput, index: int, max_pixels: int) -> Decoded:
    """Decode request image number `index`; errors name ``images[index]``."""
    if image.encoded is not None:
        return decode_encoded(image.encoded, f"images[{index}].encoded", max_pixels)
    if image.raw is not None:
        return decode_raw(image.raw, image.height, image.width, f"images[{index}].raw", max_pixels)
    raise InvalidArgument(f"images[{index}]", "neither encoded nor raw is set")


# Model inputs or outputs for one request image: tensor name -> array whose first axis
# counts that image's items (1 for most tasks; the regions of an image for R-CNN).
Tensors = dict[str, np.ndarray]


class Task:
    """One task's pure steps. Subclasses set `tasks` (the spec tasks they serve) and
    override the three methods; none of them does I/O."""

    tasks: tuple[str, ...] = ()

    def options(self, request: dict[str, Any], spec: ModelSpec) -> Any:
        """Validate the request's task options against the model (InvalidArgument
        naming the field); the result is passed to `preprocess` and `postprocess`."""
        return request

    def preprocess(self, decoded: Decoded, spec: ModelSpec, options: Any) -> Tensors:
        """Model inputs for one image. The image input is uint8 [n, 3, H, W]; the data
        plane normalizes it when the model takes floats."""
        raise NotImplementedError

    def postprocess(self, outputs: Tensors, spec: ModelSpec, decoded: Decoded, options: Any) -> Any:
        """One image's result from its outputs (each with the item axis first)."""
        raise NotImplementedError
