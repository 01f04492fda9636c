"""`export --from-file` reading what a file says about itself: Ultralytics' metadata
(task, names, imgsz, stride), the input's layout, size, dtype and fixed batch; flags
that override it; refusals that say what was found and which flag fits (no Triton)."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from model_files import (BGR_LABELS, CLASSIFY_IMGSZ, CLASSIFY_NAMES, DETECT_IMGSZ, DETECT_NAMES, KERAS_HEIGHT,
                         KERAS_LABELS, KERAS_WIDTH, add_metadata, bgr_half_file, keras_nhwc_file,
                         keras_nhwc_weights, ultralytics_classify_file, ultralytics_detect_file,
                         ultralytics_metadata, with_external_data)
from service.export import ExportError
from service.export.files import export_from_file
from service.export.origins import ultralytics_metadata as parse_metadata
from service.spec import ModelSpec


def config(repo, name, profile="cpu") -> mc.ModelConfig:
    path = repo / name / ("configs/cpu.pbtxt" if profile == "cpu" else "config.pbtxt")
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    return {"det": ultralytics_detect_file(root / "best.onnx"), "cls": ultralytics_classify_file(root / "cls.onnx"),
            "keras": keras_nhwc_file(root / "keras.onnx"), "bgr": bgr_half_file(root / "bgr.onnx"), "root": root}


def test_ultralytics_detect_file_needs_no_flag(files, tmp_path):
    result = export_from_file(files["det"], tmp_path, instances=3)
    spec = result.spec
    assert (spec.name, spec.task, spec.output_layout) == ("best", "detection", "yolov8")
    assert spec.labels == tuple(DETECT_NAMES.values())
    assert spec.image_input.dims == (3, DETECT_IMGSZ, DETECT_IMGSZ) and spec.image_input.name == "images"
    # Ultralytics' predict conventions: letterbox, x / 255, conf 0.25, iou 0.7, max_det 300.
    assert (spec.resize_mode, spec.mean, spec.std) == ("letterbox", (0.0,) * 3, (1.0,) * 3)
    s = spec.settings
    assert (s.score_threshold, s.iou_threshold, s.max_detections) == (0.25, 0.7, 300)
    # The batch fixed at 1: no Triton batching, the batch in the config's dims.
    assert (spec.fixed_batch, spec.max_batch_size, spec.items_per_call) == (1, 0, 1)
    assert spec.sources == {"task": "file-metadata", "output_layout": "file-metadata", "labels": "file-metadata",
                            "input_layout": "file-shape", "input_size": "file-shape", "batch": "file-shape",
                            "resize_mode": "file-metadata", "mean": "file-metadata", "std": "file-metadata",
                            "channel_order": "default"}
    for profile in ("cpu", "production"):
        cfg = config(tmp_path, "best", profile)
        assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
        assert list(cfg.input[0].dims) == [1, 3, DETECT_IMGSZ, DETECT_IMGSZ]
        assert list(cfg.output[0].dims) == [1, 4 + len(DETECT_NAMES), (DETECT_IMGSZ // 8) ** 2]
        assert cfg.instance_group[0].count == 3
        assert cfg.parameters["convserve.source.labels"].string_value == "file-metadata"
    assert list(config(tmp_path, "best", "production").model_warmup[0].inputs["images"].dims) == \
        [1, 3, DETECT_IMGSZ, DETECT_IMGSZ]
    # The gateway's view: the same spec, per-item dims.
    assert ModelSpec.from_model_config(config(tmp_path, "best")) == spec


def test_flags_override_the_file_and_say_so(files, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("x\ny\nz\n")
    spec = export_from_file(files["det"], tmp_path, name="mine", labels_file=labels, resize_mode="stretch",
                            channel_order="bgr").spec
    assert (spec.name, spec.labels, spec.resize_mode, spec.channel_order) == ("mine", ("x", "y", "z"), "stretch",
                                                                             "BGR")
    assert (spec.sources["labels"], spec.sources["resize_mode"], spec.sources["channel_order"]) == \
        ("--labels", "--resize-mode", "--channel-order")
    assert spec.sources["task"] == "file-metadata"


def test_ultralytics_classify_file_keeps_its_preprocessing(files, tmp_path):
    spec = export_from_file(files["cls"], tmp_path).spec
    assert (spec.task, spec.output_layout, spec.labels) == ("classification", "probabilities",
                                                             tuple(CLASSIFY_NAMES.values()))
    # classify_transforms: Resize(imgsz) of the shorter side, CenterCrop(imgsz), x / 255.
    assert (spec.resize_mode, spec.resize_size, spec.mean, spec.std) == \
        ("resize_center_crop", CLASSIFY_IMGSZ, (0.0,) * 3, (1.0,) * 3)
    assert (spec.fixed_batch, spec.max_batch_size) == (1, 0)


def test_keras_nhwc_file_layout_and_size_come_from_its_shape(files, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(KERAS_LABELS) + "\n")
    spec = export_from_file(files["keras"], tmp_path, task="classification", layout="probabilities",
                            labels_file=labels).spec
    assert spec.input_layout == "NHWC" and spec.image_input.dims == (KERAS_HEIGHT, KERAS_WIDTH, 3)
    assert (spec.input_height, spec.input_width) == (KERAS_HEIGHT, KERAS_WIDTH)
    # A dynamic batch: batched by Triton; a non-square classifier is stretched.
    assert (spec.fixed_batch, spec.max_batch_size, spec.resize_mode) == (0, 8, "stretch")
    assert spec.sources["input_layout"] == spec.sources["input_size"] == "file-shape"
    cfg = config(tmp_path, spec.name)
    assert list(cfg.input[0].dims) == [KERAS_HEIGHT, KERAS_WIDTH, 3]
    assert cfg.parameters["convserve.input_layout"].string_value == "NHWC"
    assert ModelSpec.from_model_config(cfg) == spec


def test_refusals_say_what_was_found_and_which_flag_fits(files, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(KERAS_LABELS) + "\n")
    with pytest.raises(ExportError, match=r"input is \[N, 24, 32, 3\], which looks like NHWC: pass "
                                          r"--input-layout nhwc"):
        export_from_file(files["keras"], tmp_path, task="classification", labels_file=labels, input_layout="nchw")
    with pytest.raises(ExportError, match=r"input is \[N, 24, 32, 3\], its size fixed; --input-size 32 32 does not"):
        export_from_file(files["keras"], tmp_path, task="classification", labels_file=labels, input_size=32)
    with pytest.raises(ExportError, match="needs --task: keras.onnx names no task"):
        export_from_file(files["keras"], tmp_path, labels_file=labels)
    with pytest.raises(ExportError, match=r"needs --labels \(keras.onnx names no classes"):
        export_from_file(files["keras"], tmp_path, task="classification")
    with pytest.raises(ExportError, match=r"its batch fixed at 1: it is served one image per call \(leave "
                                          r"--max-batch-size 4 out"):
        export_from_file(files["det"], tmp_path, max_batch_size=4)


@pytest.mark.parametrize("name, converter", [
    ("model.h5", r"tf2onnx.convert.from_keras\(keras.models.load_model\('MODEL.h5'\)"),
    ("model.keras", r"tf2onnx.convert.from_keras"),
    ("saved_model.pb", r"python -m tf2onnx.convert --saved-model SAVED_MODEL_DIR"),
    ("model.tflite", r"python -m tf2onnx.convert --tflite MODEL.tflite"),
    ("model.bin", None),
])
def test_another_frameworks_file_is_refused_with_its_converter(tmp_path, name, converter):
    source = tmp_path / name
    source.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(ExportError, match=rf"takes a TorchScript .pt or an .onnx file, got {name}") as info:
        export_from_file(source, tmp_path / "repo")
    if converter is None:
        assert "convert it" not in str(info.value)
    else:
        assert "convert it to ONNX first: " in str(info.value)
        assert re.search(converter, str(info.value))


@pytest.mark.parametrize("key, value, message", [
    ("task", "segment", "an Ultralytics 'segment' export; convserve serves Ultralytics detect and classify"),
    ("names", "__import__('os').system('true')", "metadata names=.* is not a literal"),
    ("names", "{1: 'a', 2: 'b'}", r"names must map class indices 0..1"),
    ("imgsz", "[640]", r"imgsz='\[640\]' is not \[height, width\]"),
])
def test_bad_metadata_is_refused_naming_the_key(files, tmp_path, key, value, message):
    metadata = ultralytics_metadata("detect", DETECT_NAMES, DETECT_IMGSZ, 32)
    metadata[key] = value
    import onnx

    path = tmp_path / f"bad_{key}.onnx"
    model = onnx.load(str(files["det"]))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    add_metadata(path, metadata)
    with pytest.raises(ExportError, match=message):
        export_from_file(path, tmp_path / "repo")


def test_metadata_is_parsed_as_literals_only():
    parsed = parse_metadata({"names": "{0: 'person', 1: 'bicycle'}", "imgsz": "[480, 640]", "stride": "32",
                             "batch": "1", "task": "detect"}, "f.onnx")
    assert (parsed.labels, parsed.imgsz, parsed.stride, parsed.batch, parsed.task) == \
        (("person", "bicycle"), (480, 640), 32, 1, "detect")
    assert parse_metadata({}, "f.onnx").labels is None  # YOLOv5 and other files: every fact optional


def test_stride_and_fixed_batches_other_than_one_are_refused(files, tmp_path):
    import onnx

    model = onnx.load(str(files["cls"]))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    path = tmp_path / "four.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match=r"input is \[4, 3, 32, 32\], its batch fixed at 4"):
        export_from_file(path, tmp_path / "repo")
    metadata = ultralytics_metadata("classify", CLASSIFY_NAMES, 30, 32)
    dynamic = tmp_path / "dynamic.onnx"
    model = onnx.load(str(files["cls"]))
    del model.metadata_props[:]
    for k in (0, 2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[k].dim_param = "d"
    onnx.save(model, str(dynamic))
    add_metadata(dynamic, metadata)
    with pytest.raises(ExportError, match="input size 30x30 is not a multiple of the model's stride 32"):
        export_from_file(dynamic, tmp_path / "repo")


def test_float16_bgr_file_keeps_its_dtype(files, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(BGR_LABELS) + "\n")
    spec = export_from_file(files["bgr"], tmp_path, task="classification", labels_file=labels,
                            channel_order="bgr").spec
    assert spec.image_input.dtype == np.float16 and spec.channel_order == "BGR"
    assert config(tmp_path, spec.name).input[0].data_type == mc.TYPE_FP16


def test_cli_exports_an_ultralytics_file_with_no_flag(files, tmp_path):
    repo = tmp_path / "repo"
    done = subprocess.run([sys.executable, "-m", "service.cli", "export", "--from-file", str(files["det"]),
                           "--repo", str(repo), "--instances", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert config(repo, "best").instance_group[0].count == 2
    assert "labels from file-metadata" in done.stdout and "batch from file-shape" in done.stdout
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(KERAS_LABELS) + "\n")
    done = subprocess.run([sys.executable, "-m", "service.cli", "export", "--from-file", str(files["keras"]),
                           "--repo", str(repo), "--task", "classification", "--labels", str(labels),
                           "--input-layout", "nchw"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "pass --input-layout nhwc" in done.stderr


def test_torchscript_nhwc_file_is_refused_with_the_flag_that_fits(tmp_path):
    """A TorchScript file says nothing of its input: when it fails on NCHW and runs on
    NHWC, the refusal names --input-layout nhwc; with the flag it is served NHWC."""
    import torch

    class ChannelsLast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.permute(0, 3, 1, 2)).mean((2, 3))   # [N, H, W, 3] -> [N, 2]

    source = tmp_path / "nhwc.pt"
    torch.jit.save(torch.jit.script(ChannelsLast().eval()), str(source))
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    with pytest.raises(ExportError, match=r"runs on \[N, 20, 20, 3\], which looks like NHWC: pass --input-layout nhwc"):
        export_from_file(source, tmp_path / "repo", task="classification", input_size=20, labels_file=labels)
    spec = export_from_file(source, tmp_path / "repo", task="classification", input_size=20, labels_file=labels,
                            input_layout="nhwc").spec
    assert spec.input_layout == "NHWC" and spec.image_input.dims == (20, 20, 3)


def _keras_labels(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(KERAS_LABELS) + "\n")
    return labels


def test_external_data_goes_along_and_the_entry_answers_as_the_weights_say(tmp_path):
    """An ONNX file whose tensors live in a data file (in a subfolder, as the file names
    it): the entry holds both, at the same relative place, and ONNX Runtime on the
    entry's model.onnx answers as the dense layer written out in numpy."""
    import onnxruntime as ort

    source = with_external_data(keras_nhwc_file(tmp_path / "keras.onnx"), "weights/keras.bin")
    result = export_from_file(source, tmp_path / "repo", task="classification", labels_file=_keras_labels(tmp_path),
                              layout="probabilities")
    version = result.path / "1"
    assert sorted(str(p.relative_to(version)) for p in version.rglob("*") if p.is_file()) == \
        ["model.onnx", "weights/keras.bin"]
    x = np.random.default_rng(1).normal(size=(2, KERAS_HEIGHT, KERAS_WIDTH, 3)).astype(np.float32)
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    weight, bias = keras_nhwc_weights()
    logits = x.reshape(2, -1).astype(np.float64) @ weight + bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(got, expected / expected.sum(1, keepdims=True), atol=1e-5)


def test_external_data_outside_the_folder_or_missing_is_refused(tmp_path):
    import onnx

    source = with_external_data(keras_nhwc_file(tmp_path / "keras.onnx"), "keras.bin")
    (tmp_path / "keras.bin").rename(tmp_path / "elsewhere.bin")
    with pytest.raises(ExportError, match=r"keeps tensors in 'keras.bin', which is not there .*copy it next to"):
        export_from_file(source, tmp_path / "repo", task="classification", labels_file=_keras_labels(tmp_path))
    model = onnx.load(str(source), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.bin"
    source.write_bytes(model.SerializeToString())
    with pytest.raises(ExportError, match=r"keeps tensors in '../elsewhere.bin', outside its folder"):
        export_from_file(source, tmp_path / "repo", task="classification", labels_file=_keras_labels(tmp_path))
    assert not (tmp_path / "repo" / "keras").exists()


def test_a_checkpoint_or_a_non_torchscript_file_is_named_for_what_it_is(tmp_path):
    """A torch.save checkpoint is not TorchScript: the refusal says so and how to export
    it, before any input size is asked for and without unpickling anything."""
    import zipfile

    import torch

    checkpoint = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(2, 3)}, checkpoint)
    with pytest.raises(ExportError, match=r"weights.pth is a torch.save checkpoint .* `convserve export ARCH "
                                          r"--weights weights.pth`"):
        export_from_file(checkpoint, tmp_path / "repo", task="classification")
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a zip archive" * 10)
    with pytest.raises(ExportError, match=r"model.pt is not a TorchScript file \(torch.jit.save writes a zip"):
        export_from_file(garbage, tmp_path / "repo")
    other_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("other/readme.txt", "hello")
    with pytest.raises(ExportError, match=r"other.pt is not a TorchScript file \(its archive holds no constants"):
        export_from_file(other_zip, tmp_path / "repo")
    # A real TorchScript file passes the check (and the export reads its outputs).
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)).eval(),
                                   torch.zeros(1, 3, 8, 8)), str(scripted))
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    assert export_from_file(scripted, tmp_path / "repo", task="classification", labels_file=labels,
                            input_size=8).spec.labels == ("a", "b")
