"""Faster R-CNN and Mask R-CNN exported as `rcnn_candidates`: the TorchScript model's
candidates, after the gateway's `select_detections` + clip, equal stock torchvision's
detections with the same weights on real photos (boxes, labels, scores, masks).

The reference is built independently of the zoo: torchvision's own classes assembled
the way its builders do when they load trained weights (FrozenBatchNorm2d; eps 0 for the
ResNet-50 COCO_V1 models), loading the test checkpoint strictly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import as_array, assert_close_scaled, photo
from rcnn_weights import make_checkpoint
from service.export import zoo
from service.ops.boxes import clip_boxes, select_detections
from service.export import ExportError
from service.export.repository import build_spec, export_model
from service.export.checkpoints import checkpoint_num_classes
from service.ops.masks import paste_masks
from references import SIZE, stock_model

BOX_ATOL_PX = 1e-2
SCORE_ATOL = 1e-5
MASK_IOU = 0.99
MIN_DETECTIONS = 5
# Each architecture on two photos (ResNet-50 FPN is ~1 s per image on CPU, so few).
CASES = {
    "fasterrcnn_mobilenet_v3_large_fpn": ("astronaut.png", "chelsea.png"),
    "fasterrcnn_resnet50_fpn": ("coffee.png",),
    "maskrcnn_resnet50_fpn": ("motorcycle_left.png", "astronaut.png"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (scripted model, stock model, spec), built once per architecture."""
    root = tmp_path_factory.mktemp("rcnn")
    cache = {}

    def get(arch_name: str):
        if arch_name not in cache:
            ckpt = make_checkpoint(arch_name, root / f"{arch_name}.pth", seed=0)
            result = export_model(arch_name, root / "repo", weights=ckpt, input_size=SIZE, max_batch_size=4)
            scripted = torch.jit.load(str(result.path / "1" / "model.pt")).eval()
            cache[arch_name] = (scripted, stock_model(arch_name, ckpt), result.spec)
        return cache[arch_name]
    return get


def image_tensors(name: str):
    array = np.array(as_array(photo(name)))
    uint8 = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return uint8, uint8.float() / 255.0


def gateway_selection(outputs, spec, width: int, height: int):
    """What the gateway makes of one image's candidates (numpy, as in the pipeline)."""
    boxes, scores, labels, count = (o.numpy() for o in outputs[:4])
    n = int(count[0])
    keep = select_detections(boxes[:n], scores[:n], labels[:n],
                             score_threshold=spec.settings.score_threshold,
                             iou_threshold=spec.settings.iou_threshold,
                             max_detections=spec.settings.max_detections)
    selected = {"boxes": clip_boxes(boxes[keep], width, height), "scores": scores[keep], "labels": labels[keep]}
    if len(outputs) > 4:
        selected["masks"] = outputs[4].numpy()[keep]
    return selected, n


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@pytest.mark.parametrize("arch_name,photo_name", [(a, p) for a, photos in CASES.items() for p in photos])
def test_candidates_reproduce_stock_torchvision(exported, arch_name, photo_name):
    scripted, stock, spec = exported(arch_name)
    uint8, as_float = image_tensors(photo_name)
    height, width = uint8.shape[1:]
    with torch.inference_mode():
        expected = stock([as_float])[0]
        outputs = [o[0] for o in scripted(uint8[None])]
    got, count = gateway_selection(outputs, spec, width, height)

    assert count < spec.settings.max_candidates, "candidates hit K: stock parity is not guaranteed"
    assert len(expected["boxes"]) >= MIN_DETECTIONS
    np.testing.assert_array_equal(got["labels"], expected["labels"].numpy())
    np.testing.assert_allclose(got["scores"], expected["scores"].numpy(), rtol=0, atol=SCORE_ATOL)
    np.testing.assert_allclose(got["boxes"], expected["boxes"].numpy(), rtol=0, atol=BOX_ATOL_PX)
    # Padding rows are zeros.
    assert not outputs[0][count:].any() and not outputs[1][count:].any() and not outputs[2][count:].any()
    if "masks" in got:
        ours = paste_masks(got["masks"], got["boxes"], height, width)
        theirs = expected["masks"][:, 0].numpy() > 0.5
        assert ours.any(axis=(1, 2)).sum() >= MIN_DETECTIONS
        assert mask_iou(ours, theirs).min() >= MASK_IOU


def test_batch_equals_single_images(exported):
    """Images of one shape in one call give each image's single-call answer."""
    scripted, _, _ = exported("fasterrcnn_mobilenet_v3_large_fpn")
    uint8, _ = image_tensors("astronaut.png")
    batch = torch.stack([uint8, uint8.flip(-1)])
    with torch.inference_mode():
        together = scripted(batch)
        for i in range(2):
            alone = scripted(batch[i:i + 1])
            for name, t, a in zip(("boxes", "scores", "labels", "count", "masks"), together, alone):
                if not t.is_floating_point():
                    assert torch.equal(t[i:i + 1], a), name
                    continue
                # Batched convolutions round differently: ~1e-6 of each output's scale.
                assert_close_scaled(t[i:i + 1], a, rtol=1e-5, atol=1e-4, err_msg=name)


def test_spec_carries_sizes_and_candidates(exported):
    _, _, spec = exported("fasterrcnn_mobilenet_v3_large_fpn")
    assert spec.output_layout == "rcnn_candidates" and spec.resize_mode == "none"
    assert spec.image_input.dims == (3, -1, -1) and spec.image_input.dtype == np.uint8
    assert spec.options["min_size"] == str(SIZE) and spec.options["max_size"] == str(round(SIZE * 1333 / 800))
    k = int(spec.options["max_candidates"])
    assert [(t.name, t.dtype, t.dims) for t in spec.outputs] == [
        ("boxes__0", np.float32, (k, 4)), ("scores__1", np.float32, (k,)),
        ("labels__2", np.int64, (k,)), ("count__3", np.int32, (1,))]
    assert len(spec.labels) == 91 and spec.labels[1] == "person"


def test_default_spec_and_mask_outputs():
    arch = zoo.get("maskrcnn_resnet50_fpn")
    spec = build_spec(arch, "m", ["x"] * 91, 4)
    assert spec.task == "instance_segmentation"
    assert spec.options["min_size"] == "800" and spec.options["max_size"] == "1333"
    assert spec.outputs[-1].name == "masks__4" and spec.outputs[-1].dims == (300, 28, 28)


def test_class_count_comes_from_the_checkpoint(tmp_path):
    """A checkpoint trained for another class count sets the labels (box predictor rows);
    a disagreeing --num-classes is refused."""
    arch = zoo.get("fasterrcnn_mobilenet_v3_large_fpn")
    state = arch.build(5).state_dict()
    assert checkpoint_num_classes(state, arch) == 5
    path = tmp_path / "five.pth"
    torch.save(state, path)
    with pytest.raises(ExportError, match="class counts disagree"):
        export_model(arch.name, tmp_path / "repo", weights=path, num_classes=91, input_size=64)
