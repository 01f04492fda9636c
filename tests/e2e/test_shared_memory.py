"""Tensors through system shared memory: the stack's gateway (shared memory on, as under
`convserve serve`) answers exactly as a second gateway on the same Triton that sends
them over gRPC, for fixed-size outputs (in the region) and variable-size ones (over
gRPC beside it); its regions are registered with Triton and cleaned up at exit."""
from __future__ import annotations

import os
import signal

import grpc
import numpy as np
import pytest

from conftest import start_gateway
from helpers import encode, free_port, photo
from service._proto import vision_pb2, vision_pb2_grpc

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def grpc_only(stack):
    """A second gateway on the stack's Triton, tensors over gRPC."""
    port = free_port()
    gateway, _ = start_gateway(stack.workdir, stack.triton_grpc_port, port, 0,
                               extra_env={"CONVSERVE_TRITON_SHARED_MEMORY": "false"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield vision_pb2_grpc.VisionStub(channel)
    finally:
        gateway.terminate()
        gateway.wait(30)


def regions(stack) -> list[str]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.triton_grpc_port}")
    return [r.name for r in client.get_system_shared_memory_status().regions.values()]


def test_the_gateway_registers_regions_and_answers_as_over_grpc(stack, vision, grpc_only):
    images = [vision_pb2.Image(encoded=encode(photo(name), "JPEG", quality=90))
              for name in ("astronaut.png", "coffee.png")]
    request = vision_pb2.DetectRequest(model="yolo", images=images, score_threshold=0.0001, max_detections=50)
    via_shm = vision.Detect(request, timeout=120)
    via_grpc = grpc_only.Detect(request, timeout=120)
    assert [len(r.detections) for r in via_shm.results] == [len(r.detections) for r in via_grpc.results]
    assert sum(len(r.detections) for r in via_shm.results) > 0
    for a, b in zip(via_shm.results, via_grpc.results):
        assert [d.label.index for d in a.detections] == [d.label.index for d in b.detections]
        assert [d.label.score for d in a.detections] == [d.label.score for d in b.detections]
        assert [(d.box.x_min, d.box.y_max) for d in a.detections] == [(d.box.x_min, d.box.y_max) for d in b.detections]
    ours = [name for name in regions(stack) if name.startswith("convserve_")]
    assert ours, "the shared-memory gateway registered no region with Triton"


def test_variable_size_outputs_come_over_grpc_beside_the_region(vision, grpc_only):
    # cyclegan takes any size: its output's size is known only from Triton's answer.
    image = vision_pb2.Image(encoded=encode(photo("coffee.png", max_side=96), "PNG"))
    request = vision_pb2.GenerateRequest(model="cyclegan", images=[image], output_format="png")
    a, b = vision.Generate(request, timeout=120).results[0], grpc_only.Generate(request, timeout=120).results[0]
    assert (a.width, a.height) == (b.width, b.height) and a.image == b.image


def run_gateway(stack):
    port = free_port()
    gateway, _ = start_gateway(stack.workdir, stack.triton_grpc_port, port, 0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        image = vision_pb2.Image(encoded=encode(photo("chelsea.png"), "JPEG"))
        vision_pb2_grpc.VisionStub(channel).Classify(
            vision_pb2.ClassifyRequest(model="resnet18", images=[image]), timeout=60)
    return gateway, f"convserve_{gateway.pid}_"


def test_no_name_in_dev_shm_and_regions_unregistered_at_exit(stack):
    gateway, prefix = run_gateway(stack)
    try:
        assert any(name.startswith(prefix) for name in regions(stack))
        # Unlinked as soon as Triton mapped them: nothing to leak from /dev/shm.
        assert not any(name.startswith(prefix) for name in os.listdir("/dev/shm"))
    finally:
        gateway.terminate()
        assert gateway.wait(30) == 0
    assert not any(name.startswith(prefix) for name in regions(stack))


def test_a_killed_gateways_regions_are_swept_by_the_next(stack):
    killed, prefix = run_gateway(stack)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert any(name.startswith(prefix) for name in regions(stack))  # Triton still holds them
    successor, _ = run_gateway(stack)
    try:
        assert not any(name.startswith(prefix) for name in regions(stack))
    finally:
        successor.terminate()
        successor.wait(30)
