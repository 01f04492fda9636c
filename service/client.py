"""`convserve predict`: a small gRPC client that prints results or draws them.

It asks the model's task with GetModel, then calls that task's method; each task has one
function here that sends the request, prints the answer and draws `--out`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
from PIL import Image, ImageOps

from ._proto import vision_pb2, vision_pb2_grpc


def _fail(error: grpc.RpcError) -> int:
    print(f"convserve predict: {error.code().name}: {error.details()}", file=sys.stderr)
    return 1


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
    if args.json:
        _print_json(response, [{"image": str(p), "labels": r} for p, r in zip(args.images, rows)])
    else:
        for path, labels in zip(args.images, rows):
            print(f"{path}  ({response.model} v{response.model_version})")
            print(f"  {'rank':>4}  {'index':>5}  {'score':>8}  label")
            for rank, label in enumerate(labels, 1):
                print(f"  {rank:>4}  {label['index']:>5}  {label['score']:>8.4f}  {label['name']}")
    if args.out:
        from .draw import draw_labels

        lines = [f"{l['name']}  {l['score']:.3f}" for l in rows[0]]
        draw_labels(_upright(args.images[0]), lines).save(args.out, format="PNG")
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
        from .draw import draw_boxes

        image = draw_boxes(_upright(args.images[0]), [
            (d["box"], f"{d['name']} {d['score']:.2f}", d["index"]) for d in rows[0]])
        image.save(args.out, format="PNG")
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


# Model task (ModelInfo.task) -> the function that calls its method.
TASKS = {
    "classification": classify,
    "detection": detect,
    "generation": generate,
}


def predict_main(args) -> int:
    channel = grpc.insecure_channel(args.server, options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    stub = vision_pb2_grpc.VisionStub(channel)
    try:
        info = stub.GetModel(vision_pb2.GetModelRequest(name=args.model), timeout=args.timeout)
    except grpc.RpcError as error:
        return _fail(error)
    call = TASKS.get(info.task)
    if call is None:
        print(f"convserve predict: model {args.model!r} is a {info.task or 'unknown'} model, "
              "which this client cannot call", file=sys.stderr)
        return 2
    images = [vision_pb2.Image(encoded=Path(p).read_bytes()) for p in args.images]
    try:
        return call(stub, args, images)
    except grpc.RpcError as error:
        return _fail(error)
