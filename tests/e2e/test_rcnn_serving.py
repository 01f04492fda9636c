"""Faster R-CNN and Mask R-CNN served by the real Triton (CPU profile, TorchScript
backend): called directly over Triton's gRPC API, their outputs have the exported
shapes and equal the local TorchScript model's on a real photo."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import as_array, photo, run_cpu_profile_file
from stack_rcnn import RCNN_STACK_ARCHITECTURES


@pytest.mark.parametrize("arch", RCNN_STACK_ARCHITECTURES)
def test_triton_serves_rcnn_candidates(stack, arch):
    import tritonclient.grpc as grpcclient

    from service.export import tvshim
    from service.spec import ModelSpec

    tvshim.install()
    image = np.ascontiguousarray(np.array(as_array(photo("motorcycle_left.png"))).transpose(2, 0, 1)[None])
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.triton_grpc_port}")
    spec = ModelSpec.from_model_config(client.get_model_config(arch).config)
    names = [t.name for t in spec.outputs]
    inputs = [grpcclient.InferInput(spec.image_input.name, list(image.shape), "UINT8")]
    inputs[0].set_data_from_numpy(image)
    result = client.infer(arch, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in names])
    served = [result.as_numpy(n) for n in names]

    k = spec.settings.max_candidates
    for tensor, array in zip(spec.outputs, served):
        assert array.shape == (1, *tensor.dims) and array.dtype == tensor.dtype
    count = int(served[names.index("count__3")][0, 0])
    assert 0 < count < k
    scores = served[names.index("scores__1")][0]
    assert np.all(np.diff(scores[:count]) <= 0) and not scores[count:].any()

    # The file the embedded CPU profile serves (its ONNX companion where it has one),
    # run here: Triton must answer what that file computes. Its parity with eager is
    # the exporter's check (tests/export).
    expected = run_cpu_profile_file(stack.repo / arch, [image])
    for name, got, want in zip(names, served, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=name)
