"""Operability through the real stack: deadlines, cancellation, queue limits, request
limits, logs, reflection and the predict CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from PIL import Image

from helpers import encode, photo
from service._proto import vision_pb2

pytestmark = pytest.mark.e2e


def _metric(stack, line_prefix: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def _wait_in_flight_zero(stack, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = _metric(stack, 'convserve_requests_in_flight{method="Classify"}')
        if value == 0:
            return value
        time.sleep(0.1)
    return value


def _slow_request(request_id_images=1):
    tiny = vision_pb2.Image(encoded=encode(photo("chelsea.png", max_side=64), "PNG"))
    return vision_pb2.ClassifyRequest(model="slow", images=[tiny] * request_id_images)


def _access_log(stack, request_id: str, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in stack.gateway_log.read_text().splitlines():
            if request_id in line:
                entry = json.loads(line)
                if entry.get("request_id") == request_id:
                    return entry
        time.sleep(0.1)
    raise AssertionError(f"no access log line for {request_id}")


def test_short_deadline_against_slow_model(stack, vision):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        vision.Classify(_slow_request(), timeout=0.05, metadata=[("x-request-id", "deadline-1")])
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 0.4  # well before the 0.5 s model finishes
    assert _wait_in_flight_zero(stack) == 0
    assert _access_log(stack, "deadline-1")["code"] in ("DEADLINE_EXCEEDED", "CANCELLED")


def test_cancelled_call_is_cancelled_in_the_gateway(stack, vision):
    future = vision.Classify.future(_slow_request(), timeout=30, metadata=[("x-request-id", "cancel-1")])
    time.sleep(0.15)
    assert future.cancel()
    assert _wait_in_flight_zero(stack) == 0
    assert _access_log(stack, "cancel-1")["code"] == "CANCELLED"


def test_triton_queue_full_is_resource_exhausted(vision):
    # slow: max_batch_size 1 and a Triton queue of 1, so concurrent calls overflow it.
    def call(_):
        try:
            # A generous deadline: only Triton's queue may refuse these calls.
            vision.Classify(_slow_request(), timeout=300)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name
    # Earlier tests may have left slow calls running inside Triton: wait until one
    # call goes through, so that the burst below starts on an idle model.
    deadline = time.monotonic() + 60
    while call(0) != "OK":
        assert time.monotonic() < deadline, "the slow model never became idle"
        time.sleep(0.2)
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(call, range(6)))
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes


def test_too_many_images_names_the_limit(vision):
    tiny = vision_pb2.Image(encoded=encode(Image.new("RGB", (8, 8)), "PNG"))
    with pytest.raises(grpc.RpcError) as info:
        vision.Classify(vision_pb2.ClassifyRequest(model="resnet18", images=[tiny] * 65), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 64" in info.value.details()


def test_receive_message_limit(stack):
    from service._proto import vision_pb2_grpc

    big = vision_pb2.Image(encoded=b"\0" * (65 * 1024 * 1024))
    with grpc.insecure_channel(stack.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        with pytest.raises(grpc.RpcError) as info:
            vision_pb2_grpc.VisionStub(channel).Classify(
                vision_pb2.ClassifyRequest(model="resnet18", images=[big]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_one_json_log_line_per_request(stack, vision):
    image = encode(photo("coffee.png"), "JPEG")
    vision.Classify(vision_pb2.ClassifyRequest(model="resnet18", images=[vision_pb2.Image(encoded=image)] * 2),
                    timeout=30, metadata=[("x-request-id", "log-check-7")])
    entry = _access_log(stack, "log-check-7")
    assert entry["method"] == "Classify" and entry["model"] == "resnet18"
    assert entry["images"] == 2 and entry["code"] == "OK" and entry["duration_ms"] > 0
    lines = [l for l in stack.gateway_log.read_text().splitlines() if "log-check-7" in l]
    assert len(lines) == 1
    assert all(len(l) < 2000 for l in lines)  # no image bytes in the log


def test_stage_metrics_and_in_flight(stack, vision):
    vision.Classify(vision_pb2.ClassifyRequest(
        model="resnet18", images=[vision_pb2.Image(encoded=encode(photo("rocket.jpg"), "JPEG"))]), timeout=30)
    for stage in ("pool_wait", "decode", "preprocess", "infer", "postprocess"):
        count = _metric(stack, f'convserve_stage_duration_seconds_count{{model="resnet18",stage="{stage}"}}')
        assert count and count >= 1, stage
    assert _metric(stack, 'convserve_request_bytes_count{method="Classify"}') >= 1
    assert _wait_in_flight_zero(stack) == 0


def test_reflection_lists_the_service(stack):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with stack.channel() as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "convserve.v1.Vision" in services and "grpc.health.v1.Health" in services


def test_predict_cli_table_json_and_png(stack, tmp_path):
    image_path = tmp_path / "chelsea.jpg"
    photo("chelsea.png").save(image_path, quality=92)
    base = [sys.executable, "-m", "service.cli", "predict", str(image_path), "--model", "resnet18",
            "--server", stack.address]
    table = subprocess.run(base + ["--top-k", "3"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    rows = [l for l in table.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert len(rows) == 3
    as_json = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=60)
    payload = json.loads(as_json.stdout)
    assert payload["model"] == "resnet18" and len(payload["results"][0]["labels"]) == 5
    out = tmp_path / "out.png"
    drawn = subprocess.run(base + ["--out", str(out)], capture_output=True, text=True, timeout=60)
    assert drawn.returncode == 0, drawn.stderr
    with Image.open(out) as result:
        assert result.format == "PNG" and result.size == photo("chelsea.png").size
    missing = subprocess.run(base[:-4] + ["--model", "nope", "--server", stack.address],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
    # What the caller sent is exit 2 with the field and the reason, never a traceback.
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(bytes(range(256)) * 4)
    bad = subprocess.run(base[:4] + [str(garbage)] + base[5:],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "INVALID_ARGUMENT: images[0].encoded: not a decodable image" in bad.stderr, \
        bad.stderr
    assert "Traceback" not in bad.stderr
    # A file that is not there, a negative count, a version that does not exist: exit 2,
    # the field and the value, no traceback.
    for extra, message in (
            ([str(tmp_path / "nowhere.jpg")], "images: " + str(tmp_path / "nowhere.jpg") + ": No such file"),
            ([str(image_path), "--top-k", "-1"], "argument --top-k: must be 0 or more, got -1"),
            ([str(image_path), "--model-version", "7"], "NOT_FOUND: model 'resnet18' has no version '7'")):
        refused = subprocess.run(base[:4] + extra + base[5:], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
