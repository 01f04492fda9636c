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


def slow_plan(counts, shapes, items_per_call):
    """Every (image, item) in order, grouped by shape in order of first appearance,
    cut into calls of at most items_per_call items."""
    groups = {}
    for i, key in enumerate(shapes):
        groups.setdefault(key, []).extend((i, k) for k in range(counts[i]))
    calls = []
    for items in groups.values():
        calls += [items[lo:lo + items_per_call] for lo in range(0, len(items), items_per_call)]
    return calls


def expand(batches):
    return [[(i, k) for i, lo, hi in b.parts for k in range(lo, hi)] for b in batches]


@pytest.mark.parametrize("seed", range(40))
def test_plan_equals_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    counts = rng.integers(1, 12, n).tolist()
    shapes = rng.integers(0, 3, n).tolist()
    items_per_call = int(rng.choice([1, 2, 4, 8]))
    got = expand(batch_plan(counts, shapes, items_per_call))
    assert got == slow_plan(counts, shapes, items_per_call)
    # Every item exactly once, and no call over the limit.
    assert sorted(itertools.chain(*got)) == sorted((i, k) for i in range(n) for k in range(counts[i]))
    assert all(len(call) <= items_per_call for call in got)


def test_a_fixed_batch_of_one_is_one_call_per_item():
    """A model whose batch is fixed at 1: whatever the images and items, one each."""
    counts, shapes = [1, 3, 1, 2], ["a", "a", "b", "a"]
    one_each = [[item] for call in slow_plan(counts, shapes, 10) for item in call]
    assert expand(batch_plan(counts, shapes, 1)) == one_each
    with pytest.raises(ValueError, match="at least 1"):
        batch_plan(counts, shapes, 0)


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
                     max_batch_size=max_batch_size, fixed_batch=0 if max_batch_size else 1)


@pytest.mark.parametrize("max_batch_size, dims, sizes", [
    (4, (3, 8, 8), [(1, 8, 8)] * 11),                        # more images than max_batch_size
    (2, (3, 8, 8), [(5, 8, 8), (1, 8, 8), (3, 8, 8)]),       # several items per image (R-CNN regions)
    (8, (3, -1, -1), [(1, 8, 8), (1, 6, 10), (1, 8, 8), (2, 6, 10)]),  # variable size: a group per shape
    (0, (3, -1, -1), [(1, 8, 8), (1, 8, 8), (1, 4, 4), (2, 4, 4)]),    # batch fixed at 1: a call per item
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
    limit = max_batch_size or 1
    assert all(shape["images__0"][0] <= limit for shape in triton.calls)
    if not max_batch_size:
        assert len(triton.calls) == sum(n for n, _, _ in sizes)
    assert len({shape["images__0"][1:] for shape in triton.calls}) == len({s[1:] for s in sizes})


class GatedTriton(DoublingTriton):
    """Holds every call until `expected` calls are in flight at once: a data plane that
    sent one image per call but one call after another would never get past it."""

    def __init__(self, expected: int):
        super().__init__()
        self.expected, self.in_flight, self.most = expected, 0, 0

    async def infer(self, spec, version, inputs, timeout_s):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.wait_for(self._all_in(), timeout=5)
            return await super().infer(spec, version, inputs, timeout_s)
        finally:
            self.in_flight -= 1

    async def _all_in(self):
        while self.most < self.expected:
            await asyncio.sleep(0.001)


def test_fixed_batch_model_gets_one_image_per_call_all_at_once():
    images = 5
    per_image = [{"images__0": np.full((1, 3, 8, 8), i, np.uint8)} for i in range(images)]
    triton = GatedTriton(images)
    plane = DataPlane(Settings(), triton)
    try:
        results, _ = asyncio.run(plane.infer(spec(0), "", per_image, None))
    finally:
        plane.close()
    assert triton.most == images and [c["images__0"] for c in triton.calls] == [(1, 3, 8, 8)] * images
    assert [int(r["logits__0"][0, 0, 0, 0]) for r in results] == [2 * i for i in range(images)]
