"""The data plane's batching: the plan against a slow reference, and `DataPlane.infer`
splitting a fake model's outputs back per image (mixed sizes, more items than
max_batch_size, variable-size models, models without batching)."""
from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from service.gateway.dataplane import DataPlane, batch_plan
from service.settings import Settings
from service.spec import ModelSpec, TensorSpec


def slow_plan(counts, shapes, max_batch_size):
    """Every (image, item) in order, grouped by shape in order of first appearance,
    cut into calls of at most max_batch_size items (0: the whole group)."""
    groups = {}
    for i, key in enumerate(shapes):
        groups.setdefault(key, []).extend((i, k) for k in range(counts[i]))
    calls = []
    for items in groups.values():
        step = max_batch_size or max(len(items), 1)
        calls += [items[lo:lo + step] for lo in range(0, len(items), step)]
    return calls


def expand(batches):
    return [[(i, k) for i, lo, hi in b.parts for k in range(lo, hi)] for b in batches]


@pytest.mark.parametrize("seed", range(40))
def test_plan_equals_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    counts = rng.integers(1, 12, n).tolist()
    shapes = rng.integers(0, 3, n).tolist()
    max_batch_size = int(rng.choice([0, 1, 2, 4, 8]))
    got = expand(batch_plan(counts, shapes, max_batch_size))
    assert got == slow_plan(counts, shapes, max_batch_size)
    # Every item exactly once, and no call over the limit.
    assert sorted(itertools.chain(*got)) == sorted((i, k) for i in range(n) for k in range(counts[i]))
    assert all(len(call) <= (max_batch_size or sum(counts)) for call in got)


class DoublingTriton:
    """A fake Triton client: each output is its input x 2 (float32), per call recorded."""

    def __init__(self):
        self.calls = []

    async def infer(self, spec, version, inputs, timeout_s):
        self.calls.append({k: v.shape for k, v in inputs.items()})
        await asyncio.sleep(0)
        (array,) = inputs.values()
        return {spec.outputs[0].name: array.astype(np.float32) * 2}, "1"


def spec(max_batch_size, dims=(3, 8, 8)):
    return ModelSpec(name="m", task="classification", architecture="t",
                     inputs=(TensorSpec("images__0", np.dtype(np.uint8), dims),),
                     outputs=(TensorSpec("logits__0", np.dtype(np.float32), dims),),
                     max_batch_size=max_batch_size)


@pytest.mark.parametrize("max_batch_size, dims, sizes", [
    (4, (3, 8, 8), [(1, 8, 8)] * 11),                        # more images than max_batch_size
    (2, (3, 8, 8), [(5, 8, 8), (1, 8, 8), (3, 8, 8)]),       # several items per image (R-CNN regions)
    (8, (3, -1, -1), [(1, 8, 8), (1, 6, 10), (1, 8, 8), (2, 6, 10)]),  # variable size: a group per shape
    (0, (3, -1, -1), [(1, 8, 8), (1, 8, 8), (1, 4, 4)]),      # no batching: a group per call
])
def test_infer_splits_outputs_back_per_image(max_batch_size, dims, sizes):
    rng = np.random.default_rng(len(sizes))
    per_image = [{"images__0": rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)} for n, h, w in sizes]
    triton = DoublingTriton()
    plane = DataPlane(Settings(), triton)
    try:
        results, version = asyncio.run(plane.infer(spec(max_batch_size, dims), "", per_image, None))
    finally:
        plane.close()
    assert version == "1"
    for got, sent in zip(results, per_image):
        np.testing.assert_array_equal(got["logits__0"], sent["images__0"].astype(np.float32) * 2)
    limit = max_batch_size or sum(n for n, _, _ in sizes)
    assert all(shape["images__0"][0] <= limit for shape in triton.calls)
    assert len({shape["images__0"][1:] for shape in triton.calls}) == len({s[1:] for s in sizes})
