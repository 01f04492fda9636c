"""Imported files of the shared end-to-end stack (see conftest.py), each brought in as
its origin hands it over (tests/model_files.py builds them):

- ``ultra_det``: an Ultralytics detect export, batch fixed at 1, exported with no
  flag but ``--instances 2``: task, labels, size and batch from the file.
- ``ultra_cls``: an Ultralytics classify export, no flag at all.
- ``keras_nhwc``: a tf2onnx-style Keras classifier, NHWC, 24 x 32, probabilities,
  Keras MobileNet's normalization; its tensors in an external data file in a subfolder
  (as ONNX files over 2 GB keep theirs), which the entry must carry along.
- ``caffe_bgr``: a float16 model trained on BGR (``--channel-order bgr``).
"""
from __future__ import annotations

from pathlib import Path

ULTRA_DET_INSTANCES = 2
KERAS_EXTERNAL_DATA = "keras_nhwc.weights/tensors.bin"


def export(repo: Path, root: Path, checkpoints: dict) -> None:
    from model_files import (BGR_LABELS, KERAS_LABELS, KERAS_MEAN, KERAS_STD, bgr_half_file, keras_nhwc_file,
                             ultralytics_classify_file, ultralytics_detect_file, with_external_data)
    from service.export.files import export_from_file

    files = root / "imports"
    files.mkdir()
    checkpoints["ultra_det"] = ultralytics_detect_file(files / "ultra_det.onnx")
    export_from_file(checkpoints["ultra_det"], repo, instances=ULTRA_DET_INSTANCES)
    checkpoints["ultra_cls"] = ultralytics_classify_file(files / "ultra_cls.onnx")
    export_from_file(checkpoints["ultra_cls"], repo)

    labels = files / "keras_labels.txt"
    labels.write_text("\n".join(KERAS_LABELS) + "\n")
    checkpoints["keras_nhwc"] = with_external_data(keras_nhwc_file(files / "keras_nhwc.onnx"),
                                                   KERAS_EXTERNAL_DATA)
    export_from_file(checkpoints["keras_nhwc"], repo, task="classification", layout="probabilities",
                     labels_file=labels, mean=KERAS_MEAN, std=KERAS_STD, max_batch_size=4)
    labels = files / "bgr_labels.txt"
    labels.write_text("\n".join(BGR_LABELS) + "\n")
    checkpoints["caffe_bgr"] = bgr_half_file(files / "caffe_bgr.onnx")
    export_from_file(checkpoints["caffe_bgr"], repo, task="classification", labels_file=labels,
                     channel_order="bgr", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), max_batch_size=4)
