"""Proto <-> plain data: unset optional fields are None (the model's default), images
keep their kind, answers keep their order and pixel coordinates, and a domain error
becomes its status with a BadRequest detail naming the field."""
from __future__ import annotations

import numpy as np
from google.rpc import code_pb2, error_details_pb2, status_pb2

from service._proto import vision_pb2
from service.errors import InvalidArgument, NotFound
from service.gateway import convert
from service.gateway.dataplane import Answer
from service.pipelines.common import ImageInput
from service.pipelines.detection import Detections
from service.pipelines.segmentation import SegmentationResult


def test_images_keep_their_kind_and_order():
    images = convert.images_from_proto([
        vision_pb2.Image(encoded=b"jpeg"),
        vision_pb2.Image(raw=vision_pb2.RawImage(data=b"\0" * 12, height=2, width=2)),
        vision_pb2.Image()])
    assert images == [ImageInput(encoded=b"jpeg"), ImageInput(raw=b"\0" * 12, height=2, width=2), ImageInput()]


def test_unset_options_are_none_and_set_zero_is_kept():
    assert convert.detect_options(vision_pb2.DetectRequest()) == {
        "score_threshold": None, "iou_threshold": None, "max_detections": None, "class_ids": []}
    request = vision_pb2.DetectRequest(score_threshold=0.0, max_detections=3, class_ids=[1, 2])
    assert convert.detect_options(request) == {
        "score_threshold": 0.0, "iou_threshold": None, "max_detections": 3, "class_ids": [1, 2]}
    assert convert.classify_options(vision_pb2.ClassifyRequest()) == {"top_k": None}
    assert convert.generate_options(vision_pb2.GenerateRequest(jpeg_quality=80)) == {
        "output_format": "", "jpeg_quality": 80}


def test_mask_format_names_and_unknown_numbers_passed_on():
    names = [convert.segment_options(vision_pb2.SegmentRequest(mask_format=f))["mask_format"]
             for f in (vision_pb2.MASK_FORMAT_UNSPECIFIED, vision_pb2.MASK_FORMAT_RLE, vision_pb2.MASK_FORMAT_PNG, 9)]
    assert names == [None, "rle", "png", 9]


def test_detect_frame_is_the_plain_request():
    frame = convert.detect_frame(vision_pb2.DetectRequest(
        model="yolo", model_version="2", images=[vision_pb2.Image(encoded=b"x")], iou_threshold=0.5))
    assert (frame.model, frame.version, frame.images) == ("yolo", "2", [ImageInput(encoded=b"x")])
    assert frame.options["iou_threshold"] == 0.5


def test_detections_best_first_in_original_pixels():
    result = Detections(boxes=np.array([[1, 2, 30, 40], [5, 6, 7, 8]], np.float32),
                        scores=np.array([0.9, 0.5], np.float32), labels=np.array([3, 1]),
                        names=("cat", "dog"), width=64, height=48)
    response = convert.detect_response(Answer("yolo", "1", [result]))
    assert (response.model, response.model_version) == ("yolo", "1")
    first, second = response.results[0].detections
    assert (first.box.x_min, first.box.y_min, first.box.x_max, first.box.y_max) == (1, 2, 30, 40)
    assert (first.label.index, first.label.name) == (3, "cat") and abs(first.label.score - 0.9) < 1e-6
    assert second.label.name == "dog"
    assert (response.results[0].image_width, response.results[0].image_height) == (64, 48)


def test_instance_masks_as_rle_or_png():
    instances = Detections(boxes=np.array([[0, 0, 2, 2], [1, 1, 3, 2]], np.float32),
                           scores=np.array([0.8, 0.8], np.float32), labels=np.array([1, 1]),
                           names=("person", "person"), width=4, height=3,
                           masks=({"rle": [3, 9]}, {"png": b"png"}))
    out = convert.segmentation_to_proto(SegmentationResult(4, 3, instances=instances))
    assert out.instances[0].mask.rle == vision_pb2.Rle(height=3, width=4, counts=[3, 9])
    assert out.instances[1].mask.png == b"png"
    assert (out.instances[1].box.x_max, out.instances[1].label.name) == (3, "person")


def test_invalid_argument_status_names_the_field():
    status = convert.error_status(InvalidArgument("images[2].encoded", "corrupt"))
    assert status.code.name == "INVALID_ARGUMENT" and status.details == "images[2].encoded: corrupt"
    rich = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    assert rich.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(bad) and bad.field_violations[0].field == "images[2].encoded"


def test_other_errors_carry_no_detail():
    status = convert.error_status(NotFound("unknown model 'x'"))
    assert status.code.name == "NOT_FOUND" and status.details == "unknown model 'x'"
    rich = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    assert not rich.details


def test_model_info_says_where_the_weights_came_from():
    from types import SimpleNamespace

    from references import sample_spec

    status = SimpleNamespace(name="m", versions=["1"], ready=True)
    assert convert.model_info(status, sample_spec(weights="seeded")).weights == "seeded"
    assert convert.model_info(status, sample_spec(weights="IMAGENET1K_V1")).weights == "IMAGENET1K_V1"
    assert convert.model_info(status, sample_spec()).weights == ""  # exported before it was recorded
