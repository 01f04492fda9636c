"""Every torchvision classifier by name: registered from torchvision's own tables with
its weights' preset (checked against torchvision's ImageClassification objects, without
exporting all ~80), and a few small ones really exported in both formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from service.export import zoo
from service.export.repository import export_model
from service.spec import ModelSpec

# torchvision imports after the package's op shim (CPU torch lacks its compiled ops).
import torchvision  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

from helpers import assert_close_scaled

NAMES = torchvision.models.list_models(module=torchvision.models)
IMAGENET_LABELS = zoo.read_labels("imagenet_classes.txt")


def classifier_weights(name):
    return [w for w in torchvision.models.get_model_weights(name) if w.meta.get("categories")]


def test_the_list_is_torchvisions_and_covers_the_families():
    assert len(NAMES) >= 80
    for name in ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf",
                 "convnext_tiny", "densenet121", "shufflenet_v2_x0_5", "squeezenet1_0", "mnasnet0_5",
                 "resnext50_32x4d", "wide_resnet50_2", "inception_v3", "vit_b_16", "swin_t", "alexnet", "vgg16",
                 "googlenet", "resnet18"):
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_classifier_is_registered_with_its_weights_preset(name):
    arch = zoo.get(name)
    assert arch.task == "classification" and arch.resize_mode == "resize_center_crop"
    first = classifier_weights(name)[0]
    # torchvision's own transform object is the reference, not the partial's keywords.
    transform = first.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    assert arch.input_size == (crop, crop)
    assert arch.resize_size == resize
    assert arch.interpolation == transform.interpolation.value
    assert transform.antialias  # PIL resizes antialiased, as the gateway does
    np.testing.assert_allclose(arch.mean, transform.mean)
    np.testing.assert_allclose(arch.std, transform.std)
    assert arch.num_classes == len(first.meta["categories"]) == 1000
    published = arch.published()
    assert published["DEFAULT"].name == torchvision.models.get_model_weights(name).DEFAULT.name
    for w in classifier_weights(name):
        entry = published[w.name]
        # The labels file is every published weights' category list.
        assert list(entry.labels) == IMAGENET_LABELS
        assert entry.url == w.url and entry.filename == w.url.rsplit("/", 1)[1]
        t = w.transforms()
        assert (entry.preset["input_size"], entry.preset["resize_size"], entry.preset["interpolation"]) == (
            (t.crop_size[0],) * 2, t.resize_size[0], t.interpolation.value)


def test_presets_differ_where_torchvision_says():
    # Bicubic weights, a 232 resize for the V2 recipe, Inception's 299/342.
    assert zoo.get("efficientnet_b0").interpolation == InterpolationMode.BICUBIC.value == "bicubic"
    assert zoo.get("swin_t").interpolation == "bicubic"
    assert zoo.get("mobilenet_v2").interpolation == "bilinear"
    assert (zoo.get("inception_v3").input_size, zoo.get("inception_v3").resize_size) == ((299, 299), 342)
    v1, v2 = (zoo.get("mobilenet_v2").published()[n].preset for n in ("IMAGENET1K_V1", "IMAGENET1K_V2"))
    assert (v1["resize_size"], v2["resize_size"]) == (256, 232)
    swag = zoo.get("vit_b_16").published()["IMAGENET1K_SWAG_E2E_V1"].preset
    assert (swag["input_size"], swag["resize_size"], swag["interpolation"]) == ((384, 384), 384, "bicubic")
    # The architecture keeps torchvision's original recipe (its first weights): the
    # classifiers that were registered by hand before are unchanged.
    for name in ("alexnet", "vgg16", "resnet50", "googlenet"):
        arch = zoo.get(name)
        assert (arch.input_size, arch.resize_size, arch.interpolation) == ((224, 224), 256, "bilinear")


SMALL = [("mobilenet_v3_small", "torchscript"), ("mobilenet_v3_small", "onnx"),
         ("squeezenet1_0", "torchscript"), ("squeezenet1_0", "onnx"),
         ("shufflenet_v2_x0_5", "torchscript"), ("shufflenet_v2_x0_5", "onnx"),
         ("efficientnet_b0", "torchscript"), ("efficientnet_b0", "onnx")]


@pytest.mark.parametrize("name,fmt", SMALL)
def test_small_classifiers_export_with_parity(tmp_path, name, fmt):
    # export_model checks the exported file against eager and raises beyond the bound.
    result = export_model(name, tmp_path, fmt=fmt, input_size=64, num_classes=10, max_batch_size=2)
    spec = result.spec
    arch = zoo.get(name)
    assert (spec.input_height, spec.input_width) == (64, 64)
    assert spec.interpolation == arch.interpolation
    # The crop ratio of the architecture's preset is kept at the smaller size.
    assert spec.resize_size == round(64 * arch.resize_size / arch.input_size[0])
    # The interpolation travels in the config and back.
    config = spec.to_model_config("cpu", fmt)
    assert ModelSpec.from_model_config(config).interpolation == arch.interpolation


def test_inception_v3_takes_torchvision_checkpoints_and_transforms_input(tmp_path):
    """A torchvision-format Inception v3 checkpoint (with its AuxLogits head) loads, and the
    export computes what torchvision's published-weights model computes: transform_input
    on, auxiliary head unused."""
    torch.manual_seed(3)
    reference = torchvision.models.inception_v3(weights=None, num_classes=10, aux_logits=True,
                                                transform_input=True, init_weights=True).eval()
    path = tmp_path / "inception.pth"
    torch.save(reference.state_dict(), path)
    result = export_model("inception_v3", tmp_path / "repo", weights=path, max_batch_size=2)
    assert (result.spec.input_height, result.spec.resize_size) == (299, 342)
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(result.spec.mean).view(1, 3, 1, 1), torch.tensor(result.spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = reference((images.float() / 255 - mean) / std)
        got = torch.jit.load(str(result.path / "1" / "model.pt"))(images)
    assert_close_scaled(got.numpy(), want.numpy(), rtol=1e-4)
