"""U-Net and SegNet: shapes, TorchScript and ONNX Runtime against eager, and torchvision
vgg16_bn weights in SegNet's encoder."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from service.export import zoo
from service.export.zoo import segmentation as seg

from helpers import assert_close_scaled

# Scripted TorchScript runs the same kernels as eager; ONNX Runtime has its own.
SCRIPT_ATOL = 1e-5
ONNX_RTOL, ONNX_ATOL = 1e-4, 1e-4


def seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and batch-norm statistics far from the identity, in eval mode, so
    that a wrong layer order or a skipped norm cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


def onnx_session(model, example, dynamic=True):
    import onnxruntime as ort

    buffer = io.BytesIO()
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["logits"], dynamic_axes=axes if dynamic else None)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(buffer.getvalue(), options)


# ------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("depth,base,bilinear,batch_norm", [(1, 4, False, True), (2, 8, True, True),
                                                            (3, 4, False, False), (4, 4, True, True)])
def test_unet_output_has_input_size(depth, base, bilinear, batch_norm):
    model = seeded(seg.UNet(num_classes=5, depth=depth, base_width=base, bilinear=bilinear, batch_norm=batch_norm))
    unit = 2 ** depth
    for h, w in [(unit * 3, unit * 5), (unit * 7, unit)]:
        with torch.inference_mode():
            out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, 5, h, w)


def test_unet_widths_follow_depth_and_base():
    model = seg.UNet(num_classes=3, depth=3, base_width=16)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 16 and model.outc.in_channels == 16 and model.outc.out_channels == 3
    assert max(c.out_channels for c in convs) == 16 * 2 ** 3
    with pytest.raises(ValueError, match="depth must be >= 1"):
        seg.UNet(depth=0)


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_scripted_and_onnx_equal_eager(bilinear):
    model = seeded(seg.UNet(num_classes=4, depth=3, base_width=8, bilinear=bilinear))
    scripted = torch.jit.script(model)
    session = onnx_session(model, torch.randn(1, 3, 40, 56))
    for shape in [(1, 3, 40, 56), (2, 3, 24, 32)]:  # the second: another batch and size
        x = torch.randn(*shape)
        with torch.inference_mode():
            expected = model(x)
            torch.testing.assert_close(scripted(x), expected, rtol=0, atol=SCRIPT_ATOL)
        got = session.run(None, {"images": x.numpy()})[0]
        assert_close_scaled(got, expected.numpy(), rtol=ONNX_RTOL, atol=ONNX_ATOL)


# ------------------------------------------------------------------------ SegNet
def test_index_unpool_equals_max_unpool2d():
    x = torch.randn(2, 5, 12, 18)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    expected = F.max_unpool2d(pooled, indices, 2, 2)
    assert torch.equal(seg.IndexUnpool()(pooled, indices, [12, 18]), expected)
    assert torch.equal(torch.jit.script(seg.IndexUnpool())(pooled, indices, [12, 18]), expected)


def test_segnet_shapes_script_and_onnx():
    model = seeded(seg.SegNet(num_classes=6))
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        expected = model(x)
    assert expected.shape == (1, 6, 64, 96)
    with torch.inference_mode():
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=0, atol=SCRIPT_ATOL)
    session = onnx_session(model, x)
    assert_close_scaled(session.run(None, {"images": x.numpy()})[0], expected.numpy(),
                        rtol=ONNX_RTOL, atol=ONNX_ATOL)
    x2 = torch.randn(2, 3, 32, 64)
    with torch.inference_mode():
        assert_close_scaled(session.run(None, {"images": x2.numpy()})[0], model(x2).numpy(),
                            rtol=ONNX_RTOL, atol=ONNX_ATOL)


def test_segnet_decoder_mirrors_encoder():
    model = seg.SegNet(num_classes=3)
    encoder = [[m.out_channels for m in stage if isinstance(m, torch.nn.Conv2d)] for stage in model.encoder]
    decoder = [[m.out_channels for m in stage if isinstance(m, torch.nn.Conv2d)] for stage in model.decoder]
    assert encoder == [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
    assert decoder == [[512, 512, 512], [512, 512, 256], [256, 256, 128], [128, 64], [64, 64]]
    assert model.classifier.out_channels == 3


@pytest.fixture(scope="module")
def vgg16_bn():
    from service.export import tvshim

    tvshim.install()
    import torchvision

    torch.manual_seed(7)
    return seeded(torchvision.models.vgg16_bn(weights=None), seed=7)


def test_segnet_loads_torchvision_vgg16_bn_encoder(vgg16_bn):
    model = seg.SegNet(num_classes=21).eval()
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    seg.load_vgg16_bn_encoder(model, vgg16_bn.state_dict())
    mapped = seg.vgg16_bn_encoder_state_dict(vgg16_bn.state_dict())
    assert set(mapped) == {k for k in model.state_dict() if k.startswith("encoder.")}
    assert torch.equal(mapped["encoder.0.0.weight"], vgg16_bn.state_dict()["features.0.weight"])
    assert torch.equal(model.state_dict()["encoder.4.7.running_var"], vgg16_bn.state_dict()["features.41.running_var"])
    for key, value in decoder_before.items():  # the decoder is left alone
        assert torch.equal(model.state_dict()[key], value), key
    # The encoder computes what torchvision's features compute (its last pool included).
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        h = x
        for stage in model.encoder:
            h, _ = model.pool(stage(h))
        torch.testing.assert_close(h, vgg16_bn.features(x), rtol=0, atol=0)


def test_vgg_mapping_names_what_is_missing():
    with pytest.raises(ValueError, match=r"no features\.0\.\* keys"):
        seg.vgg16_bn_encoder_state_dict({"conv1.weight": torch.zeros(1)})


# ---------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", ["unet", "segnet"])
def test_registered_architectures(name):
    arch = zoo.get(name)
    assert arch.task == "semantic_segmentation" and arch.resize_mode == "stretch"
    assert arch.num_classes == 21 and arch.layout.output_names == ("logits__0",)
    h, w = arch.input_size
    assert h % 32 == 0 and w % 32 == 0


def test_unet_export_form_normalizes_uint8_inside():
    arch = zoo.get("unet")
    model = seeded(arch.build(arch.num_classes))
    spec = type("Spec", (), {"mean": arch.mean, "std": arch.std, "options": {}})()
    wrapped = arch.wrap(model, spec).eval()
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    mean = torch.tensor(arch.mean).view(1, 3, 1, 1)
    std = torch.tensor(arch.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        got = wrapped(images)
        expected = model((images / 255.0 - mean) / std)
        scripted = torch.jit.script(wrapped)(images)
    assert got.shape == (1, 21, 64, 64) and got.dtype == torch.float32
    assert_close_scaled(got, expected, rtol=1e-4, atol=1e-4)  # another normalization arithmetic
    torch.testing.assert_close(scripted, got, rtol=0, atol=SCRIPT_ATOL)
