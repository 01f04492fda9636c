"""The shared-memory transport's sizing and sweeping (service/gateway/triton.py)."""
from __future__ import annotations

import os

import numpy as np

from references import sample_spec
from service.gateway.triton import (SHM_ALIGN, SHM_MIN_REGION_BYTES, SharedMemoryPool, _output_bytes, _owner_gone,
                                    _RegionLayout)
from service.spec import TensorSpec


def test_region_capacity_is_a_power_of_two_from_one_mib():
    assert SharedMemoryPool.capacity(1) == SHM_MIN_REGION_BYTES
    assert SharedMemoryPool.capacity(SHM_MIN_REGION_BYTES) == SHM_MIN_REGION_BYTES
    assert SharedMemoryPool.capacity(SHM_MIN_REGION_BYTES + 1) == 2 * SHM_MIN_REGION_BYTES
    # A 640x640 detector: 1.2 MB in, 2.8 MB out (84 x 8400 float32) in one 4 MiB region.
    assert SharedMemoryPool.capacity(3 * 640 * 640 + 84 * 8400 * 4) == 4 * SHM_MIN_REGION_BYTES


def test_region_layout_places_inputs_then_fixed_outputs_aligned():
    spec = sample_spec()  # uint8 [3, 224, 224] in, float32 [C] out, batched
    images = np.zeros((3, 3, 224, 224), np.uint8)
    out = spec.outputs[0]
    assert _output_bytes(spec, out, 3) == 3 * int(np.prod(out.dims)) * 4
    aligned = lambda n: -(-n // SHM_ALIGN) * SHM_ALIGN  # noqa: E731
    layout = _RegionLayout.of(spec, {spec.image_input.name: images})
    assert layout.nbytes == aligned(images.nbytes) + aligned(3 * out.dims[0] * 4)
    assert layout.inputs == {spec.image_input.name: 0}
    assert layout.outputs == {out.name: (aligned(images.nbytes), 3 * out.dims[0] * 4)}


def test_variable_size_outputs_are_left_to_grpc():
    spec = sample_spec()
    variable = TensorSpec("generated__0", np.dtype(np.float32), (3, -1, -1))
    assert _output_bytes(spec, variable, 2) is None


def test_only_regions_of_gateways_that_ended_are_swept():
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert _owner_gone(f"convserve_{int(ended.stdout)}_0a1b2c3d_1")
    assert _owner_gone(f"convserve_{os.getpid()}_0a1b2c3d_1")  # our pid under another tag: a predecessor
    assert not _owner_gone(f"convserve_{os.getppid()}_0a1b2c3d_1")  # alive
    assert not _owner_gone("someone_else_1") and not _owner_gone("convserve_notapid_1")
