"""The resize plan's interpolation against torchvision's own transforms on PIL images
(Resize with bilinear or bicubic, then CenterCrop), and its travel through the spec."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.export import tvshim
from service.ops import resize
from service.spec import ModelSpec

from helpers import photo
from references import sample_spec

tvshim.install()
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402


def torchvision_resize_crop(image: Image.Image, resize_size: int, crop: int, mode: InterpolationMode) -> np.ndarray:
    """uint8 [3, crop, crop]: what torchvision's ImageClassification does to a PIL image
    before it converts it to float."""
    out = TF.center_crop(TF.resize(image, [resize_size], interpolation=mode, antialias=True), [crop, crop])
    return np.asarray(out).transpose(2, 0, 1)


@pytest.mark.parametrize("mode", [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC])
@pytest.mark.parametrize("size", [(451, 300), (300, 451), (97, 130)])
def test_resize_center_crop_matches_torchvision(mode, size):
    image = photo("chelsea.png", max_side=480).resize(size, Image.LANCZOS)
    plan = resize.plan("resize_center_crop", *size, 56, 56, resize_size=64, resample=mode.value)
    got = plan.apply(image).astype(int)
    want = torchvision_resize_crop(image, 64, 56, mode).astype(int)
    # The crop is folded into the resize (a source box): the same filter taps, so at
    # most a rounding step apart, on few pixels.
    assert np.abs(got - want).max() <= 1
    assert (got != want).mean() < 0.01


def test_bicubic_is_not_bilinear():
    image = photo("chelsea.png", max_side=300)
    bilinear = resize.plan("resize_center_crop", *image.size, 56, 56, resize_size=64).apply(image)
    bicubic = resize.plan("resize_center_crop", *image.size, 56, 56, resize_size=64, resample="bicubic").apply(image)
    assert np.abs(bilinear.astype(int) - bicubic.astype(int)).max() > 2


def test_stretch_honours_the_interpolation():
    image = photo("chelsea.png", max_side=300)
    got = resize.plan("stretch", *image.size, 40, 30, resample="bicubic").apply(image)
    want = np.asarray(image.resize((40, 30), Image.BICUBIC)).transpose(2, 0, 1)
    np.testing.assert_array_equal(got, want)


def test_an_unknown_interpolation_is_refused():
    with pytest.raises(resize.ResizeError, match="nearest"):
        resize.plan("stretch", 10, 10, 8, 8, resample="nearest")
    with pytest.raises(ValueError, match="interpolation"):
        sample_spec(interpolation="nearest")


def test_the_spec_carries_the_interpolation_and_old_configs_mean_bilinear():
    spec = sample_spec(interpolation="bicubic")
    config = spec.to_model_config("cpu")
    assert config.parameters["convserve.interpolation"].string_value == "bicubic"
    assert ModelSpec.from_model_config(config).interpolation == "bicubic"
    del config.parameters["convserve.interpolation"]  # written before the parameter existed
    assert ModelSpec.from_model_config(config).interpolation == "bilinear"
