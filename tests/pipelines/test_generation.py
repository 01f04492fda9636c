"""The generation pipeline's pure steps: options, the resize/pad plan, reflection
padding (against torch's ReflectionPad2d), denormalization, encoding, and the whole
per-image pipeline around an eager generator against a reference written out here,
including the max_side downscale."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import as_array, photo
from service.errors import FailedPrecondition, InvalidArgument
from service.ops.imaging import Decoded
from service.ops.resize import reflect_pad
from service.pipelines import generation as g
from service.pipelines import layouts
from service.pipelines.common import resize_plan
from service.spec import ModelSpec, TensorSpec


def spec(resize_mode="none", dims=(3, -1, -1), layout="image_nchw_tanh", **options) -> ModelSpec:
    return ModelSpec(
        name="gen", task="generation", architecture="test",
        inputs=(TensorSpec("images__0", np.dtype(np.uint8), dims),),
        outputs=(TensorSpec("generated__0", np.dtype(np.float32), dims),),
        resize_mode=resize_mode, mean=(0.5,) * 3, std=(0.5,) * 3, output_layout=layout,
        options={k: str(v) for k, v in options.items()})


CYCLEGAN = dict(size_multiple=4, min_side=8, max_side=512)


# ----------------------------------------------------------------------- options
def test_options_defaults_and_formats():
    assert g.resolve_options("", None) == g.Options("PNG", "image/png", g.DEFAULT_JPEG_QUALITY)
    assert g.resolve_options("JPEG", 1) == g.Options("JPEG", "image/jpeg", 1)
    assert g.resolve_options("jpg", 100).mime_type == "image/jpeg"
    assert g.resolve_options("png", 50).pil_format == "PNG"


@pytest.mark.parametrize("fmt, quality, field", [
    ("gif", None, "output_format"), ("webp", 80, "output_format"),
    ("png", 0, "jpeg_quality"), ("jpeg", 101, "jpeg_quality"),
])
def test_bad_options_name_the_field(fmt, quality, field):
    with pytest.raises(InvalidArgument) as info:
        g.resolve_options(fmt, quality)
    assert info.value.field == field and (fmt in info.value.message or str(quality) in info.value.message)


# ------------------------------------------------------------------------- plan
@pytest.mark.parametrize("size, scaled, padded", [
    ((90, 60), (90, 60), (92, 60)),        # width padded to a multiple of 4
    ((64, 64), (64, 64), (64, 64)),        # nothing to do
    ((5, 3), (5, 3), (8, 8)),              # at least min_side
    ((1000, 600), (512, 307), (512, 308)),  # longer side capped, aspect kept
    ((300, 2000), (77, 512), (80, 512)),
])
def test_cyclegan_plan(size, scaled, padded):
    p = resize_plan(spec(**CYCLEGAN), *size)
    assert (p.width, p.height) == size
    assert (p.scaled_width, p.scaled_height) == scaled and (p.input_width, p.input_height) == padded
    assert p.resized == (scaled != size)


def test_stretch_plan_and_unsupported_specs():
    p = resize_plan(spec("stretch", (3, 256, 256)), 120, 80)
    assert (p.scaled_width, p.scaled_height, p.input_width, p.input_height) == (256, 256, 256, 256)
    assert p.resized
    with pytest.raises(FailedPrecondition, match="letterbox"):
        g.TASK.options({}, spec("letterbox", (3, 64, 64)))
    with pytest.raises(FailedPrecondition, match="variable size"):
        resize_plan(spec("none", (3, 64, 64)), 10, 10)
    with pytest.raises(layouts.BadModelOption, match="max_side"):
        resize_plan(spec(max_side="big"), 10, 10)


# ---------------------------------------------------------------------- padding
@pytest.mark.parametrize("h, w, H, W", [(5, 7, 8, 8), (6, 3, 12, 8), (8, 8, 8, 8), (2, 9, 8, 12)])
def test_reflect_pad_equals_torch_reflection_pad(h, w, H, W):
    import torch
    import torch.nn.functional as F

    chw = np.random.default_rng(h * w).integers(0, 256, (3, h, w), dtype=np.uint8)
    got = reflect_pad(chw, H, W)
    # torch pads at most size-1 per call; reflect repeatedly, as numpy does
    x = torch.from_numpy(chw.astype(np.float32))[None]
    while x.shape[2] < H or x.shape[3] < W:
        ph, pw = min(H - x.shape[2], x.shape[2] - 1), min(W - x.shape[3], x.shape[3] - 1)
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    np.testing.assert_array_equal(got, x[0].numpy().astype(np.uint8))


def test_one_pixel_side_is_repeated():
    chw = np.arange(3 * 1 * 3, dtype=np.uint8).reshape(3, 1, 3)
    got = reflect_pad(chw, 8, 8)
    assert got.shape == (3, 8, 8)
    np.testing.assert_array_equal(got[:, :, :3], np.repeat(chw, 8, axis=1))


# ------------------------------------------------------------- denormalize, encode
def test_to_pixels_layouts():
    y = np.array([-1.5, -1.0, -0.2, 0.0, 0.999, 1.0, 3.0], dtype=np.float32)
    out = np.broadcast_to(y, (3, 1, len(y)))
    expected = np.clip(np.round((y.astype(np.float64) + 1) * 127.5), 0, 255)
    np.testing.assert_array_equal(layouts.to_pixels(out, "image_nchw_tanh")[0, :, 0], expected)
    np.testing.assert_array_equal(layouts.to_pixels(out / 2 + 0.5, "image_nchw_01")[0, :, 0], expected)
    with pytest.raises(KeyError):
        layouts.to_pixels(out, "logits")  # not a generator layout: no denormalization


def test_encode_png_lossless_and_jpeg():
    image = photo("chelsea.png", max_side=64)
    png = g.encode(image, g.resolve_options("png", None))
    np.testing.assert_array_equal(as_array(Image.open(io.BytesIO(png))), as_array(image))
    jpeg = Image.open(io.BytesIO(g.encode(image, g.resolve_options("jpeg", 90))))
    assert jpeg.format == "JPEG" and jpeg.size == image.size


# ------------------------------------------------------------ whole, with a model
@pytest.fixture(scope="module")
def generator():
    import torch

    from service.export.zoo import generation as zg

    torch.manual_seed(3)
    return zg.ResnetGenerator(3, 3, 16, norm_layer=zg.get_norm_layer("instance"), n_blocks=2).eval()


def run_pipeline(model, image: Image.Image, model_spec: ModelSpec, output_format="png") -> tuple:
    """preprocess -> the eager model, as the exported wrapper runs it -> postprocess."""
    import torch

    from service.export.zoo import generation as zg

    wrapped = zg.ImageGenerator(model).eval()
    task, decoded = g.TASK, Decoded(image)
    options = task.options({"output_format": output_format}, model_spec)
    inputs, context = task.preprocess(decoded, model_spec, options)
    with torch.inference_mode():
        y = wrapped(torch.from_numpy(inputs["images__0"])).numpy()
    return inputs["images__0"], task.postprocess({"generated__0": y}, context, model_spec, options)


def reference(model, image: Image.Image, scaled: tuple[int, int] | None) -> np.ndarray:
    """Written out: PIL resize, torch reflect pad to a multiple of 4, [-1, 1], model,
    round((y + 1) * 127.5), crop, PIL resize back."""
    import torch
    import torch.nn.functional as F

    small = image.resize(scaled, Image.BILINEAR) if scaled else image
    x = torch.from_numpy(as_array(small).transpose(2, 0, 1).copy())[None].float() / 127.5 - 1
    h, w = x.shape[2:]
    x = F.pad(x, (0, -w % 4, 0, -h % 4), mode="reflect")
    with torch.inference_mode():
        y = model(x)[0, :, :h, :w]
    pixels = ((y + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    out = Image.fromarray(pixels)
    return as_array(out.resize(image.size, Image.BILINEAR) if scaled else out)


@pytest.mark.parametrize("max_side, scaled", [(512, None), (48, (48, 32))])
def test_pipeline_equals_reference(generator, max_side, scaled):
    image = photo("chelsea.png", max_side=90)  # 90x60
    assert image.size == (90, 60)
    inputs, result = run_pipeline(generator, image, spec(size_multiple=4, min_side=8, max_side=max_side))
    assert inputs.shape == ((1, 3, 60, 92) if scaled is None else (1, 3, 32, 48))
    got = Image.open(io.BytesIO(result.image))
    assert result.mime_type == "image/png" and got.format == "PNG"
    assert (result.width, result.height) == got.size == image.size
    expected = reference(generator, image, scaled)
    assert np.abs(as_array(got).astype(int) - expected.astype(int)).max() <= 1
    assert expected.std() > 10  # the output depends on the input; equality is no accident


def test_wrong_output_shape_is_failed_precondition():
    image = Image.new("RGB", (20, 12))
    s = spec(**CYCLEGAN)
    with pytest.raises(FailedPrecondition, match="shape"):
        _, context = g.TASK.preprocess(Decoded(image), s, None)
        g.TASK.postprocess({"generated__0": np.zeros((1, 3, 8, 8), np.float32)}, context, s,
                           g.resolve_options("", None))


def test_answer_over_the_message_limit_is_resource_exhausted():
    from service.errors import ResourceExhausted

    results = [g.GeneratedImage(b"x" * 600, "image/png", 1, 1), g.GeneratedImage(b"x" * 500, "image/png", 1, 1)]
    g.check_answer_size(results, 1100)
    with pytest.raises(ResourceExhausted, match="1100 bytes.*output_format jpeg"):
        g.check_answer_size(results, 1099)
