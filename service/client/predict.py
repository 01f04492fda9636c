"""`convserve predict`: a small gRPC client that prints results or draws them.

It asks the model's task with GetModel, then calls that task's method; each task has one
function here that sends the request, draws `--out`, then prints the answer: the file
is written first, so a closed stdout (`| head`) cannot cost it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
from PIL import Image, ImageOps

from .._proto import vision_pb2, vision_pb2_grpc


# Exit statuses: 2 for what the caller sent (the command-line convention for a usage
# error, as `convserve export` uses it), 1 for everything else (server down, overload).
CALLER_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


def _fail(error: grpc.RpcError) -> int:
    print(f"convserve predict: {error.code().name}: {error.details()}", file=sys.stderr)
    return 2 if error.code() in CALLER_ERRORS else 1


def _upright(path) -> Image.Image:
    """The image as the gateway sees it: EXIF orientation applied, RGB."""
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def _print_json(response, results: list) -> None:
    print(json.dumps({"model": response.model, "model_version": response.model_version, "results": results},
                     indent=2))


def classify(stub, args, images) -> int:
    request = vision_pb2.ClassifyRequest(model=args.model, images=images, model_version=args.model_version)
    if args.top_k is not None:
        request.top_k = args.top_k
    response = stub.Classify(request, timeout=args.timeout)
    rows = [
        [{"index": l.index, "name": l.name, "score": round(l.score, 6)} for l in result.labels]
        for result in response.results
    ]
    if args.out:  # first: the file is written whatever becomes of stdout
        from .draw import draw_labels

        lines = [f"{l['name']}  {l['score']:.3f}" for l in rows[0]]
        draw_labels(_upright(args.images[0]), lines).save(args.out, format="PNG")
    if args.json:
        _print_json(response, [{"image": str(p), "labels": r} for p, r in zip(args.images, rows)])
    else:
        for path, labels in zip(args.images, rows):
            print(f"{path}  ({response.model} v{response.model_version})")
            print(f"  {'rank':>4}  {'index':>5}  {'score':>8}  label")
            for rank, label in enumerate(labels, 1):
                print(f"  {rank:>4}  {label['index']:>5}  {label['score']:>8.4f}  {label['name']}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def detect(stub, args, images) -> int:
    request = vision_pb2.DetectRequest(model=args.model, images=images, model_version=args.model_version,
                                       class_ids=getattr(args, "class_ids", None) or [])
    for field in ("score_threshold", "iou_threshold", "max_detections"):
        if getattr(args, field, None) is not None:
            setattr(request, field, getattr(args, field))
    response = stub.Detect(request, timeout=args.timeout)
    rows = [
        [{"index": d.label.index, "name": d.label.name, "score": round(d.label.score, 6),
          "box": [round(v, 2) for v in (d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max)]}
         for d in result.detections]
        for result in response.results
    ]
    if args.out:  # first: the file is written whatever becomes of stdout
        from .draw import caption, draw_boxes

        image = draw_boxes(_upright(args.images[0]), [
            (d["box"], caption(d["name"], d["score"]), d["index"]) for d in rows[0]])
        image.save(args.out, format="PNG")
    if args.json:
        _print_json(response, [{"image": str(p), "width": r.image_width, "height": r.image_height,
                                "detections": d} for p, r, d in zip(args.images, response.results, rows)])
    else:
        for path, result, detections in zip(args.images, response.results, rows):
            print(f"{path}  {result.image_width}x{result.image_height}  ({response.model} "
                  f"v{response.model_version}): {len(detections)} detections")
            print(f"  {'index':>5}  {'score':>7}  {'x_min':>7} {'y_min':>7} {'x_max':>7} {'y_max':>7}  label")
            for d in detections:
                print(f"  {d['index']:>5}  {d['score']:>7.4f}  " + " ".join(f"{v:>7.1f}" for v in d["box"])
                      + f"  {d['name']}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _generated_paths(out: Path, count: int) -> list[Path]:
    """`out` for one image; `out` with -0, -1, ... before the suffix for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def generate(stub, args, images) -> int:
    """Writes the generated image(s) to --out: JPEG when its suffix is .jpg/.jpeg, else PNG."""
    jpeg = args.out is not None and args.out.suffix.lower() in (".jpg", ".jpeg")
    request = vision_pb2.GenerateRequest(model=args.model, images=images, model_version=args.model_version,
                                         output_format="jpeg" if jpeg else "png")
    response = stub.Generate(request, timeout=args.timeout)
    paths = _generated_paths(args.out, len(response.results)) if args.out else [None] * len(response.results)
    rows = []
    for source, result, path in zip(args.images, response.results, paths):
        if path is not None:
            path.write_bytes(result.image)
        rows.append({"image": str(source), "width": result.width, "height": result.height,
                     "mime_type": result.mime_type, "bytes": len(result.image),
                     **({"out": str(path)} if path is not None else {})})
    if args.json:
        _print_json(response, rows)
    else:
        for row in rows:
            where = f" -> wrote {row['out']}" if "out" in row else " (give --out to write it)"
            print(f"{row['image']}  ({response.model} v{response.model_version}): "
                  f"{row['width']}x{row['height']} {row['mime_type']}, {row['bytes']} bytes{where}")
    return 0


def _mask(mask, height: int, width: int):
    """bool [H, W] from a Mask message (RLE or PNG)."""
    import io

    import numpy as np

    from ..ops.masks import decode_rle

    if mask.WhichOneof("encoding") == "png":
        return np.asarray(Image.open(io.BytesIO(mask.png))).astype(bool)
    return decode_rle(mask.rle.height, mask.rle.width, mask.rle.counts)


_MASK_FORMATS = {None: vision_pb2.MASK_FORMAT_UNSPECIFIED, "rle": vision_pb2.MASK_FORMAT_RLE,
                 "png": vision_pb2.MASK_FORMAT_PNG}


def segment(stub, args, images) -> int:
    """Semantic models: classes present with their pixel counts; instance models: each
    instance's label, score, box and mask area. --out: the label map or masks in colour."""
    request = vision_pb2.SegmentRequest(model=args.model, images=images, model_version=args.model_version,
                                        mask_format=_MASK_FORMATS[getattr(args, "mask_format", None)])
    for field in ("score_threshold", "iou_threshold", "max_detections"):
        if getattr(args, field, None) is not None:
            setattr(request, field, getattr(args, field))
    response = stub.Segment(request, timeout=args.timeout)
    rows = []
    for path, result in zip(args.images, response.results):
        row = {"image": str(path), "width": result.image_width, "height": result.image_height}
        if result.label_map_png:
            row["classes"] = [{"index": c.label.index, "name": c.label.name, "pixels": c.pixels,
                               "share": round(c.label.score, 6)} for c in result.classes]
        else:
            row["instances"] = [
                {"index": d.label.index, "name": d.label.name, "score": round(d.label.score, 6),
                 "box": [round(v, 2) for v in (d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max)],
                 "mask_pixels": int(_mask(d.mask, result.image_height, result.image_width).sum())}
                for d in result.instances]
        rows.append(row)
    if args.out:  # first: the file is written whatever becomes of stdout
        import io

        import numpy as np

        from .draw import caption, draw_instances, draw_label_map

        result, image = response.results[0], _upright(args.images[0])
        if result.label_map_png:
            drawn = draw_label_map(image, np.asarray(Image.open(io.BytesIO(result.label_map_png))))
        else:
            drawn = draw_instances(image, [
                ((d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max), caption(d.label.name, d.label.score),
                 _mask(d.mask, result.image_height, result.image_width)) for d in result.instances])
        drawn.save(args.out, format="PNG")
    if args.json:
        _print_json(response, rows)
    else:
        for row in rows:
            print(f"{row['image']}  {row['width']}x{row['height']}  ({response.model} v{response.model_version})")
            if "classes" in row:
                print(f"  {'index':>5}  {'pixels':>9}  {'share':>7}  class")
                for c in row["classes"]:
                    print(f"  {c['index']:>5}  {c['pixels']:>9}  {c['share']:>7.2%}  {c['name']}")
            else:
                print(f"  {'index':>5}  {'score':>6}  {'mask px':>8}  {'box (x1, y1, x2, y2)':<28}  label")
                for d in row["instances"]:
                    box = ", ".join(f"{v:.1f}" for v in d["box"])
                    print(f"  {d['index']:>5}  {d['score']:>6.3f}  {d['mask_pixels']:>8}  {box:<28}  {d['name']}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


# ModelInfo.weights of a model serving random weights (the API's value, see vision.proto).
SEEDED = "seeded"

# Model task (ModelInfo.task) -> the function that calls its method.
TASKS = {
    "classification": classify,
    "detection": detect,
    "semantic_segmentation": segment,
    "instance_segmentation": segment,
    "generation": generate,
}


def predict_main(args) -> int:
    try:
        encoded = [Path(p).read_bytes() for p in args.images]
    except OSError as error:
        print(f"convserve predict: error: images: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    channel = grpc.insecure_channel(args.server, options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    stub = vision_pb2_grpc.VisionStub(channel)
    try:
        info = stub.GetModel(vision_pb2.GetModelRequest(name=args.model), timeout=args.timeout)
    except grpc.RpcError as error:
        return _fail(error)
    if info.weights == SEEDED:
        print(f"convserve predict: warning: model {args.model!r} serves seeded random weights; its answers are "
              "meaningless until a trained checkpoint or published weights are exported", file=sys.stderr)
    call = TASKS.get(info.task)
    if call is None:
        print(f"convserve predict: model {args.model!r} is a {info.task or 'unknown'} model, "
              "which this client cannot call", file=sys.stderr)
        return 2
    images = [vision_pb2.Image(encoded=data) for data in encoded]
    try:
        return call(stub, args, images)
    except grpc.RpcError as error:
        return _fail(error)
