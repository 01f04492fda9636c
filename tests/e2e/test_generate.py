"""Generate through the real gateway and the real Triton, against independent eager
references: the generators built from the same checkpoints, fed by torch/PIL
preprocessing written out here (reflect padding with torch, resizes with PIL), and
denormalized here."""
from __future__ import annotations

import io
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from helpers import bad_request_field, as_array, encode, photo, with_exif_orientation
from service._proto import vision_pb2
from stack_generation import GEN_FILE_SIZE

pytestmark = pytest.mark.e2e

# Served PNG pixels may differ from eager by one grey level: TorchScript's float
# arithmetic can round a value at .5 the other way.
MAX_PIXEL_DIFF = 1
# The seeded generators' outputs vary with the input by tens of grey levels, far more
# than the tolerance: an equality cannot hold by accident.
MIN_OUTPUT_STD = 10.0
# CycleGAN's spec: sizes padded to a multiple of 4 (none of the test sizes is one).
SIZE_MULTIPLE = 4
PIX2PIX_SIZE = 256


def _tensor(image: Image.Image):
    import torch

    return torch.from_numpy(as_array(image).transpose(2, 0, 1).copy())[None]


def _pixels(y) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> uint8 HWC, round((y + 1) * 127.5)."""
    return ((y[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def cyclegan_reference(stack):
    import torch
    import torch.nn.functional as F

    from service.export.checkpoints import load_state_dict
    from service.export.zoo import generation as gen

    model = gen.resnet_9blocks()
    gen.load_official_state_dict(model, load_state_dict(stack.checkpoints["cyclegan"]))
    model.eval()

    def run(image: Image.Image) -> np.ndarray:
        x = _tensor(image).float() / 127.5 - 1
        h, w = x.shape[2:]
        x = F.pad(x, (0, -w % SIZE_MULTIPLE, 0, -h % SIZE_MULTIPLE), mode="reflect")
        with torch.inference_mode():
            return _pixels(model(x)[:, :, :h, :w])
    return run


@pytest.fixture(scope="module")
def pix2pix_reference(stack):
    """The official test script's behaviour: batch norm with the statistics of the
    one-image batch (train mode), dropout off (our export serves it deterministic)."""
    import torch

    from service.export.zoo import generation as gen

    model = gen.unet_256()
    model.load_state_dict(torch.load(stack.checkpoints["pix2pix"], weights_only=True))
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.train()

    def run(image: Image.Image) -> np.ndarray:
        x = _tensor(image.resize((PIX2PIX_SIZE, PIX2PIX_SIZE), Image.BILINEAR)).float() / 127.5 - 1
        with torch.no_grad():
            out = Image.fromarray(_pixels(model(x)))
        return as_array(out.resize(image.size, Image.BILINEAR))
    return run


def generate(vision, model, images, **fields):
    request = vision_pb2.GenerateRequest(model=model, images=images, **fields)
    return vision.Generate(request, timeout=120)


def _decode(result) -> Image.Image:
    image = Image.open(io.BytesIO(result.image))
    image.load()
    return image


def _check_png(result, expected: np.ndarray) -> None:
    image = _decode(result)
    assert image.format == "PNG" and result.mime_type == "image/png"
    assert (result.width, result.height) == image.size == (expected.shape[1], expected.shape[0])
    got = as_array(image)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= MAX_PIXEL_DIFF
    assert expected.std() > MIN_OUTPUT_STD


def _small(name: str, max_side: int) -> Image.Image:
    return photo(name, max_side=max_side)


def test_cyclegan_png_equals_eager(vision, cyclegan_reference):
    # Non-square sizes that are not multiples of 4, one request, two of equal size.
    images = [_small("chelsea.png", 90), _small("rocket.jpg", 70), _small("coffee.png", 90), _small("astronaut.png", 45)]
    assert any(im.width != im.height for im in images)
    response = generate(vision, "cyclegan", [vision_pb2.Image(encoded=encode(im, "PNG")) for im in images])
    assert response.model == "cyclegan" and response.model_version == "1" and len(response.results) == 4
    for image, result in zip(images, response.results):
        _check_png(result, cyclegan_reference(image))


def test_onnx_entry_equals_eager(vision, cyclegan_reference):
    images = [_small("rocket.jpg", 70), _small("chelsea.png", 50)]
    response = generate(vision, "cyclegan_onnx", [vision_pb2.Image(encoded=encode(im, "PNG")) for im in images])
    assert response.model == "cyclegan_onnx"
    for image, result in zip(images, response.results):
        _check_png(result, cyclegan_reference(image))


def test_exif_rotated_input_comes_back_upright(vision, cyclegan_reference):
    upright = _small("chelsea.png", 66).transpose(Image.ROTATE_90)  # portrait, 44x66
    assert upright.height > upright.width
    result = generate(vision, "cyclegan", [vision_pb2.Image(encoded=with_exif_orientation(upright, 6))]).results[0]
    assert (result.width, result.height) == upright.size
    # The gateway sees the JPEG-decoded upright pixels: the reference gets the same.
    decoded = Image.open(io.BytesIO(with_exif_orientation(upright, 6)))
    from PIL import ImageOps

    _check_png(result, cyclegan_reference(ImageOps.exif_transpose(decoded).convert("RGB")))


def test_raw_input_equals_encoded(vision):
    image = _small("coffee.png", 50)
    array = as_array(image)
    raw = vision_pb2.Image(raw=vision_pb2.RawImage(data=array.tobytes(), height=array.shape[0], width=array.shape[1]))
    a, b = generate(vision, "cyclegan", [raw, vision_pb2.Image(encoded=encode(image, "PNG"))]).results
    assert a.image == b.image


def test_pix2pix_stretches_and_resizes_back(vision, pix2pix_reference):
    image = _small("chelsea.png", 120)  # 120x80: stretched to 256x256, output back to 120x80
    result = generate(vision, "pix2pix", [vision_pb2.Image(encoded=encode(image, "PNG"))]).results[0]
    _check_png(result, pix2pix_reference(image))


def test_from_file_generator_gets_minus_one_one(vision, stack):
    """A --from-file generator takes float input: the gateway normalizes with the
    generation default mean = std = 0.5 and denormalizes its tanh output."""
    import torch

    model = torch.jit.load(str(stack.checkpoints["gen_file"])).eval()
    image = _small("astronaut.png", 48)
    x = _tensor(image.resize((GEN_FILE_SIZE, GEN_FILE_SIZE), Image.BILINEAR)).float() / 255
    with torch.inference_mode():
        pixels = _pixels(model((x - 0.5) / 0.5))
    expected = as_array(Image.fromarray(pixels).resize(image.size, Image.BILINEAR))
    result = generate(vision, "gen_file", [vision_pb2.Image(encoded=encode(image, "PNG"))]).results[0]
    _check_png(result, expected)
    info = vision.GetModel(vision_pb2.GetModelRequest(name="gen_file"), timeout=30)
    assert info.task == "generation" and info.resize_mode == "stretch"


def test_jpeg_output(vision):
    image = _small("chelsea.png", 90)
    images = [vision_pb2.Image(encoded=encode(image, "PNG"))]
    png = _decode(generate(vision, "cyclegan", images).results[0])
    for fmt, quality in (("jpeg", 95), ("JPG", 60)):
        result = generate(vision, "cyclegan", images, output_format=fmt, jpeg_quality=quality).results[0]
        decoded = _decode(result)
        assert decoded.format == "JPEG" and result.mime_type == "image/jpeg"
        assert decoded.size == (result.width, result.height) == image.size
        # The PNG answer's pixels, JPEG-encoded at that quality (Pillow's defaults).
        expected = as_array(Image.open(io.BytesIO(encode(png, "JPEG", quality=quality))))
        assert np.abs(as_array(decoded).astype(int) - expected.astype(int)).mean() < 1
    low = generate(vision, "cyclegan", images, output_format="jpeg", jpeg_quality=5).results[0]
    assert len(low.image) < len(result.image)



@pytest.mark.parametrize("fields, field", [
    ({"output_format": "gif"}, "output_format"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"output_format": "jpeg", "jpeg_quality": 101}, "jpeg_quality"),
])
def test_bad_fields_are_invalid_argument(vision, fields, field):
    images = [vision_pb2.Image(encoded=encode(_small("coffee.png", 40), "PNG"))]
    with pytest.raises(grpc.RpcError) as info:
        generate(vision, "cyclegan", images, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(info.value) == field and field in info.value.details()


def test_wrong_task_is_failed_precondition(vision):
    images = [vision_pb2.Image(encoded=encode(_small("coffee.png", 40), "PNG"))]
    with pytest.raises(grpc.RpcError) as info:
        generate(vision, "resnet18", images)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        vision.Classify(vision_pb2.ClassifyRequest(model="cyclegan", images=images), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_predict_cli_writes_the_generated_image(stack, tmp_path, cyclegan_reference):
    source = tmp_path / "photo.png"
    image = _small("chelsea.png", 90)
    image.save(source)
    out = tmp_path / "out.png"
    run = subprocess.run([sys.executable, "-m", "service.cli", "predict", str(source), "--model", "cyclegan",
                          "--server", stack.address, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert str(out) in run.stdout
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == image.size
        got = as_array(written)
    assert np.abs(got.astype(int) - cyclegan_reference(image).astype(int)).max() <= MAX_PIXEL_DIFF
