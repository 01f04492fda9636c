"""Protobuf messages <-> plain data.

With the servicer, the only module that touches convserve's messages: requests become
the data plane's plain inputs (`ImageInput`, option dicts, `Frame`), its `Answer`s
become responses, and a domain error becomes a `grpc.Status` with its details.
"""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .._proto import vision_pb2
from ..errors import ConvserveError, InvalidArgument
from ..pipelines.common import ImageInput
from .dataplane import Answer, Frame

# The Vision service's full name, e.g. for health and reflection.
SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["Vision"].full_name

# MaskFormat enum -> the pipeline's name (UNSPECIFIED: the default, RLE). An unknown
# number is passed on as it is, and the pipeline refuses it naming `mask_format`.
_MASK_FORMATS = {vision_pb2.MASK_FORMAT_UNSPECIFIED: None, vision_pb2.MASK_FORMAT_RLE: "rle",
                 vision_pb2.MASK_FORMAT_PNG: "png"}


# ----------------------------------------------------------------------- requests in
def images_from_proto(images) -> list[ImageInput]:
    out = []
    for image in images:
        which = image.WhichOneof("source")
        if which == "encoded":
            out.append(ImageInput(encoded=image.encoded))
        elif which == "raw":
            out.append(ImageInput(raw=image.raw.data, height=image.raw.height, width=image.raw.width))
        else:
            out.append(ImageInput())
    return out


def _optional(message, field: str):
    """An `optional` scalar field, or None when unset (the model's default)."""
    return getattr(message, field) if message.HasField(field) else None


def classify_options(request) -> dict:
    return {"top_k": _optional(request, "top_k")}


def detect_options(request) -> dict:
    return {"score_threshold": _optional(request, "score_threshold"),
            "iou_threshold": _optional(request, "iou_threshold"),
            "max_detections": _optional(request, "max_detections"),
            "class_ids": list(request.class_ids)}


def segment_options(request) -> dict:
    return {"mask_format": _MASK_FORMATS.get(request.mask_format, request.mask_format),
            "score_threshold": _optional(request, "score_threshold"),
            "iou_threshold": _optional(request, "iou_threshold"),
            "max_detections": _optional(request, "max_detections")}


def generate_options(request) -> dict:
    return {"output_format": request.output_format, "jpeg_quality": _optional(request, "jpeg_quality")}


def detect_frame(request) -> Frame:
    """One DetectStream request as a frame for `DataPlane.stream`."""
    return Frame(request.model, request.model_version, images_from_proto(request.images), detect_options(request))


# --------------------------------------------------------------------- answers out
def _label(result) -> vision_pb2.Label:
    return vision_pb2.Label(index=result.index, name=result.name, score=result.score)


def classify_response(answer: Answer) -> vision_pb2.ClassifyResponse:
    return vision_pb2.ClassifyResponse(
        model=answer.model, model_version=answer.version,
        results=[vision_pb2.Classification(labels=[_label(l) for l in labels]) for labels in answer.results])


def detections_to_proto(result) -> list[vision_pb2.Detection]:
    """`pipelines.detection.Detections` as Detection messages, best first, each with its
    mask (RLE at the image's size, or PNG) when the result has masks."""
    out = [vision_pb2.Detection(
               box=vision_pb2.Box(x_min=x1, y_min=y1, x_max=x2, y_max=y2),
               label=vision_pb2.Label(index=label, name=name, score=score))
           for (x1, y1, x2, y2), score, label, name in zip(
               result.boxes.tolist(), result.scores.tolist(), result.labels.tolist(), result.names)]
    for message, mask in zip(out, result.masks or ()):
        message.mask.CopyFrom(vision_pb2.Mask(png=mask["png"]) if "png" in mask else vision_pb2.Mask(
            rle=vision_pb2.Rle(height=result.height, width=result.width, counts=mask["rle"])))
    return out


def detect_response(answer: Answer) -> vision_pb2.DetectResponse:
    return vision_pb2.DetectResponse(
        model=answer.model, model_version=answer.version,
        results=[vision_pb2.Detections(detections=detections_to_proto(r), image_width=r.width,
                                       image_height=r.height) for r in answer.results])


def segmentation_to_proto(result) -> vision_pb2.Segmentation:
    return vision_pb2.Segmentation(
        label_map_png=result.label_map_png, image_width=result.width, image_height=result.height,
        classes=[vision_pb2.ClassPixels(label=_label(c.label), pixels=c.pixels) for c in result.classes],
        instances=detections_to_proto(result.instances) if result.instances is not None else [])


def segment_response(answer: Answer) -> vision_pb2.SegmentResponse:
    return vision_pb2.SegmentResponse(
        model=answer.model, model_version=answer.version,
        results=[segmentation_to_proto(result) for result in answer.results])


def generate_response(answer: Answer) -> vision_pb2.GenerateResponse:
    return vision_pb2.GenerateResponse(
        model=answer.model, model_version=answer.version,
        results=[vision_pb2.GeneratedImage(image=r.image, mime_type=r.mime_type, width=r.width, height=r.height)
                 for r in answer.results])


def model_info(status, spec) -> vision_pb2.ModelInfo:
    info = vision_pb2.ModelInfo(name=status.name, versions=list(status.versions), ready=status.ready)
    if spec is not None:
        info.task = spec.task
        info.architecture = spec.architecture
        info.labels.extend(spec.labels)
        info.input_width = max(spec.input_width, 0)
        info.input_height = max(spec.input_height, 0)
        info.resize_mode = spec.resize_mode
        info.max_batch_size = spec.items_per_call  # 1 for a model whose batch is fixed at 1
        info.weights = spec.weights
    return info


def list_models_response(models) -> vision_pb2.ListModelsResponse:
    return vision_pb2.ListModelsResponse(models=[model_info(status, spec) for status, spec in models])


# ------------------------------------------------------------------------- errors
def error_status(exc: ConvserveError) -> grpc.Status:
    """A domain error as the status the call ends with: its code and message, plus a
    `google.rpc.BadRequest` detail naming the field for INVALID_ARGUMENT."""
    status = status_pb2.Status(code=getattr(code_pb2, exc.code), message=exc.message)
    if isinstance(exc, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)]))
        status.details.append(detail)
    return rpc_status.to_status(status)
