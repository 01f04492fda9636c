"""The peer benchmark's reference pipeline, and the KServe model server that runs it.

`bench_peers.py` imports this module for its in-process and pipelined systems, and
runs it as a script in KServe's own virtual environment (numpy 2, grpcio 1.85) for
the KServe system, so the three run the same decode, preprocessing, ONNX Runtime and
postprocessing code. It needs numpy (1 or 2), Pillow, OpenCV and onnxruntime; kserve
only when run as a script:

    python peers_kserve_model.py --recipes JSON --threads N --grpc_port P --http_port Q

A recipe (JSON, made by bench_peers.py from the entry's configs/cpu.pbtxt) says how
one model file is fed and read: path, input and output names, task, input size,
resize mode and size, interpolation, top_k, and the detection thresholds.

- classification: Pillow decode, torchvision's Resize(resize_size) (shorter side,
  PIL filter, antialiased) and CenterCrop, uint8 NCHW; softmax and top-k.
- detection: Pillow decode, Ultralytics' LetterBox (aspect kept, OpenCV
  INTER_LINEAR, centred on grey 114), uint8 NCHW; Ultralytics' YOLOv8 predict rules
  on a [1, 4 + C, A] output: best class per anchor, score > score_threshold,
  class-aware NMS (IoU > iou_threshold suppresses), the first max_detections by
  score, boxes scaled back to the original image (`scale_boxes`) and clipped.
"""
from __future__ import annotations

import io
import sys

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
LETTERBOX_GREY = 114
# The KServe answer's tensors, by task: (name, open inference protocol datatype).
ANSWER = {"classification": (("indices", "INT64"), ("scores", "FP32")),
          "detection": (("boxes", "FP32"), ("scores", "FP32"), ("labels", "INT64"))}


def make_session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class Pipeline:
    """One model file behind one ORT session: `prepare` (decode + preprocess, no ORT)
    and `finish` (ORT + postprocess) are the two stages the pipelined system runs on
    two threads; calling the pipeline runs both. Thread-safe: ORT sessions are.
    `score_threshold` overrides the recipe's (the start-up agreement check uses it)."""

    def __init__(self, recipe: dict, threads: int):
        self.recipe = recipe
        self.threads = threads
        self.session = make_session(recipe["path"], threads)

    def __call__(self, jpeg: bytes, score_threshold: float | None = None) -> dict[str, np.ndarray]:
        return self.finish(self.prepare(jpeg), score_threshold)

    def prepare(self, jpeg: bytes) -> tuple[np.ndarray, tuple]:
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        if self.recipe["task"] == "classification":
            return center_crop(image, self.recipe), ()
        return letterbox(image, self.recipe)

    def forward(self, tensor: np.ndarray) -> np.ndarray:
        return self.session.run([self.recipe["output"]], {self.recipe["input"]: tensor})[0][0]

    def finish(self, prepared: tuple[np.ndarray, tuple], score_threshold: float | None = None) -> dict[str, np.ndarray]:
        tensor, geometry = prepared
        output = self.forward(tensor)
        if self.recipe["task"] == "classification":
            return top_k(output, self.recipe["top_k"])
        if score_threshold is None:
            score_threshold = self.recipe["score_threshold"]
        return yolo_detections(output, geometry, self.recipe, score_threshold)


# ------------------------------------------------------------------ preprocessing
def center_crop(image: Image.Image, recipe: dict) -> np.ndarray:
    """torchvision's Resize(resize_size) then CenterCrop((height, width)) on a PIL
    image, as uint8 [1, 3, height, width]."""
    w, h = image.size
    short = recipe["resize_size"]
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    resized = image.resize(size, FILTERS[recipe["interpolation"]])
    cw, ch = recipe["width"], recipe["height"]
    x0 = int(round((size[0] - cw) / 2.0))
    y0 = int(round((size[1] - ch) / 2.0))
    crop = np.asarray(resized.crop((x0, y0, x0 + cw, y0 + ch)), dtype=np.uint8)
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None])


def letterbox(image: Image.Image, recipe: dict) -> tuple[np.ndarray, tuple]:
    """Ultralytics' LetterBox(auto=False, center=True): uint8 [1, 3, H, W] and
    (gain, original width, original height) for `scale_boxes`."""
    pixels = np.asarray(image, dtype=np.uint8)
    h, w = pixels.shape[:2]
    out_h, out_w = recipe["height"], recipe["width"]
    gain = min(out_h / h, out_w / w)
    new_w, new_h = int(round(w * gain)), int(round(h * gain))
    if (new_w, new_h) != (w, h):
        pixels = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top = int(round((out_h - new_h) / 2 - 0.1))
    left = int(round((out_w - new_w) / 2 - 0.1))
    canvas = np.full((out_h, out_w, 3), LETTERBOX_GREY, np.uint8)
    canvas[top:top + new_h, left:left + new_w] = pixels
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None]), (gain, w, h)


# ------------------------------------------------------------------ postprocessing
def top_k(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    exp = np.exp(logits - logits.max())
    probs = exp / exp.sum()
    best = np.argpartition(-probs, k)[:k]
    best = best[np.argsort(-probs[best], kind="stable")]
    return {"indices": best.astype(np.int64), "scores": probs[best].astype(np.float32)}


def best_class(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each anchor's best class and its score, from a YOLOv8 [4 + C, A] output."""
    classes = pred[4:]
    labels = classes.argmax(0)
    return labels, classes[labels, np.arange(classes.shape[1])]


def yolo_detections(pred: np.ndarray, geometry: tuple, recipe: dict, threshold: float) -> dict[str, np.ndarray]:
    """Ultralytics' non_max_suppression + scale_boxes for one image's [4 + C, A]."""
    gain, width, height = geometry
    labels, scores = best_class(pred)
    rows = np.flatnonzero(scores > threshold)
    xywh = pred[:4, rows].T.astype(np.float64)
    # cv2 takes (x, y, w, h) boxes; its NMS is greedy by decreasing score, IoU > threshold
    # suppresses, and it compares boxes of the same class only (one class: agnostic).
    corner = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, 2:]], axis=1)
    groups = labels[rows].astype(np.int32) * (not recipe.get("class_agnostic", False))
    keep = np.asarray(cv2.dnn.NMSBoxesBatched(corner, scores[rows].astype(np.float32), groups,
                                              threshold, recipe["iou_threshold"]),
                      dtype=np.int64).reshape(-1)[:recipe["max_detections"]]
    boxes = np.concatenate([corner[keep, :2], corner[keep, :2] + corner[keep, 2:]], axis=1)
    pad_x = round((recipe["width"] - width * gain) / 2 - 0.1)
    pad_y = round((recipe["height"] - height * gain) / 2 - 0.1)
    boxes = (boxes - [pad_x, pad_y, pad_x, pad_y]) / gain
    boxes = boxes.clip(0, [width, height, width, height])
    return {"boxes": boxes.astype(np.float32).reshape(-1, 4), "scores": scores[rows][keep].astype(np.float32),
            "labels": labels[rows][keep].astype(np.int64)}


# ------------------------------------------------------------------ KServe
def serve(argv: list[str]) -> None:
    """KServe ModelServer with one model per recipe, named as its key; gRPC and REST
    ports and the rest from KServe's own flags (its `model_server.parser`)."""
    import argparse
    import asyncio
    import json

    import kserve
    from kserve import model_server

    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--recipes", required=True, help="JSON object: model name -> recipe")
    parser.add_argument("--threads", type=int, required=True, help="ORT intra_op_num_threads")
    args, _ = parser.parse_known_args(argv)

    class PeerModel(kserve.Model):
        """Takes one BYTES input holding one JPEG (and, for detectors, an optional
        `score_threshold` request parameter); answers the pipeline's tensors."""

        def __init__(self, name: str, recipe: dict):
            super().__init__(name)
            self.pipeline = Pipeline(recipe, args.threads)
            self.answer = ANSWER[recipe["task"]]
            self.ready = True

        async def predict(self, payload: kserve.InferRequest, headers=None) -> kserve.InferResponse:
            jpeg = payload.inputs[0].as_numpy().reshape(-1)[0]
            # A string parameter: KServe's InferParameter has no double field.
            threshold = (payload.parameters or {}).get("score_threshold")
            threshold = None if threshold is None else float(getattr(threshold, "string_param", threshold))
            # Off the event loop, so that concurrent requests overlap (decode with ORT).
            result = await asyncio.get_running_loop().run_in_executor(None, self.pipeline, bytes(jpeg), threshold)
            outputs = []
            for name, datatype in self.answer:
                out = kserve.InferOutput(name, list(result[name].shape), datatype)
                out.set_data_from_numpy(result[name], binary_data=True)
                outputs.append(out)
            return kserve.InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)

    models = [PeerModel(name, recipe) for name, recipe in json.loads(args.recipes).items()]
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port,
                       enable_latency_logging=args.enable_latency_logging).start(models)


if __name__ == "__main__":
    serve(sys.argv[1:])
