"""`convserve predict`: a small gRPC client that prints results or draws them."""
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


def predict_main(args) -> int:
    channel = grpc.insecure_channel(args.server, options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    stub = vision_pb2_grpc.VisionStub(channel)
    try:
        info = stub.GetModel(vision_pb2.GetModelRequest(name=args.model), timeout=args.timeout)
    except grpc.RpcError as error:
        return _fail(error)
    images = [vision_pb2.Image(encoded=Path(p).read_bytes()) for p in args.images]
    if info.task != "classification":
        print(f"convserve predict: model {args.model!r} is a {info.task or 'unknown'} model; "
              "this client version draws classification only", file=sys.stderr)
        return 2
    request = vision_pb2.ClassifyRequest(model=args.model, images=images, model_version=args.model_version)
    if args.top_k is not None:
        request.top_k = args.top_k
    try:
        response = stub.Classify(request, timeout=args.timeout)
    except grpc.RpcError as error:
        return _fail(error)
    rows = [
        [{"index": l.index, "name": l.name, "score": round(l.score, 6)} for l in result.labels]
        for result in response.results
    ]
    if args.json:
        print(json.dumps({"model": response.model, "model_version": response.model_version,
                          "results": [{"image": str(p), "labels": r} for p, r in zip(args.images, rows)]},
                         indent=2))
    else:
        for path, labels in zip(args.images, rows):
            print(f"{path}  ({response.model} v{response.model_version})")
            print(f"  {'rank':>4}  {'index':>5}  {'score':>8}  label")
            for rank, label in enumerate(labels, 1):
                print(f"  {rank:>4}  {label['index']:>5}  {label['score']:>8.4f}  {label['name']}")
    if args.out:
        from .draw import draw_labels

        image = ImageOps.exif_transpose(Image.open(args.images[0])).convert("RGB")
        lines = [f"{l['name']}  {l['score']:.3f}" for l in rows[0]]
        draw_labels(image, lines).save(args.out, format="PNG")
        print(f"wrote {args.out}")
    return 0
