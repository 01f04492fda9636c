"""Pix2Pix and CycleGAN generators: the official checkpoint layout, the official
InstanceNorm clean-up, and TorchScript / ONNX Runtime against eager."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from service.export import zoo
from service.export.zoo import generation as gen

from helpers import assert_close_scaled

SCRIPT_ATOL = 1e-5
ONNX_RTOL, ONNX_ATOL = 1e-4, 1e-4

# Sample keys and shapes of official latest_net_G.pth files, derived from the official
# layer order. resnet_9blocks: 0 ReflectionPad2d(3), 1 Conv 7x7, 2 norm, 3 ReLU,
# 4-6 / 7-9 stride-2 Conv, norm, ReLU, 10-18 ResnetBlocks (conv_block: 0 pad, 1 conv,
# 2 norm, 3 ReLU, 4 pad, 5 conv, 6 norm), 19-21 / 22-24 ConvTranspose, norm, ReLU,
# 25 ReflectionPad2d(3), 26 Conv 7x7, 27 Tanh. Instance norm: convs keep their bias.
RESNET_9BLOCKS_KEYS = {
    "model.1.weight": (64, 3, 7, 7), "model.1.bias": (64,),
    "model.4.weight": (128, 64, 3, 3), "model.7.weight": (256, 128, 3, 3),
    "model.10.conv_block.1.weight": (256, 256, 3, 3), "model.10.conv_block.1.bias": (256,),
    "model.10.conv_block.5.weight": (256, 256, 3, 3), "model.18.conv_block.5.bias": (256,),
    "model.19.weight": (256, 128, 3, 3), "model.22.weight": (128, 64, 3, 3), "model.22.bias": (64,),
    "model.26.weight": (3, 64, 7, 7), "model.26.bias": (3,),
}
# unet_256: UnetGenerator.model is the outermost block, whose .model is
# [0 downconv, 1 submodule, 2 ReLU, 3 upconv, 4 Tanh]; inner blocks are
# [0 LeakyReLU, 1 downconv, 2 norm, 3 submodule, 4 ReLU, 5 upconv, 6 norm] and the
# innermost [0 LeakyReLU, 1 downconv, 2 ReLU, 3 upconv, 4 norm]. Batch norm: convs
# before a norm have no bias; the outermost upconv has one.
INNERMOST = "model.model.1" + ".model.3" * 6
UNET_256_KEYS = {
    "model.model.0.weight": (64, 3, 4, 4),
    "model.model.1.model.1.weight": (128, 64, 4, 4),
    "model.model.1.model.2.weight": (128,), "model.model.1.model.2.running_mean": (128,),
    "model.model.1.model.2.num_batches_tracked": (),
    "model.model.1.model.5.weight": (256, 64, 4, 4), "model.model.1.model.6.running_var": (64,),
    "model.model.1.model.3.model.1.weight": (256, 128, 4, 4),
    "model.model.1.model.3.model.3.model.1.weight": (512, 256, 4, 4),
    INNERMOST + ".model.1.weight": (512, 512, 4, 4),
    INNERMOST + ".model.3.weight": (512, 512, 4, 4),
    INNERMOST + ".model.4.running_mean": (512,),
    "model.model.3.weight": (128, 3, 4, 4), "model.model.3.bias": (3,),
}
# Parameter counts printed by the official training scripts.
RESNET_9BLOCKS_PARAMS = 11_378_179
UNET_256_PARAMS = 54_413_955


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters and batch-norm statistics, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                if name.endswith("running_var"):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model.eval()


def uint8_images(*shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def onnx_run(model, example, inputs, dynamic):
    import onnxruntime as ort

    buffer = io.BytesIO()
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "generated": {0: "batch", 2: "height", 3: "width"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["generated"], dynamic_axes=axes if dynamic else None)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(buffer.getvalue(), options)
    return [session.run(None, {"images": x.numpy()})[0] for x in inputs]


@pytest.fixture(scope="module")
def cyclegan():
    return randomize(gen.build_cyclegan(), seed=1)


@pytest.fixture(scope="module")
def pix2pix():
    return randomize(gen.build_pix2pix(), seed=2)


# ------------------------------------------------------------- official key layout
def test_resnet_9blocks_has_official_keys(cyclegan):
    state = cyclegan.state_dict()
    for key, shape in RESNET_9BLOCKS_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # InstanceNorm2d(affine=False, track_running_stats=False): no parameters, no buffers
    assert not any(k.startswith(("model.2.", "model.10.conv_block.2.")) for k in state)
    assert sum(p.numel() for p in cyclegan.parameters()) == RESNET_9BLOCKS_PARAMS
    assert isinstance(cyclegan.model[27], torch.nn.Tanh) and len(cyclegan.model) == 28


def test_unet_256_has_official_keys(pix2pix):
    state = pix2pix.state_dict()
    for key, shape in UNET_256_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert "model.model.0.bias" not in state and "model.model.1.model.1.bias" not in state
    assert sum(p.numel() for p in pix2pix.parameters()) == UNET_256_PARAMS
    # eight stride-2 levels: the innermost block is the 7th nested one
    assert INNERMOST + ".model.5.weight" not in state


def test_official_checkpoint_with_stale_instance_norm_keys_loads(cyclegan):
    official = {k: v.clone() for k, v in cyclegan.state_dict().items()}
    stale = {}
    for prefix in ("model.2", "model.5", "model.10.conv_block.2", "model.18.conv_block.6", "model.23"):
        channels = 64 if prefix in ("model.2", "model.23") else 128 if prefix == "model.5" else 256
        stale[f"{prefix}.running_mean"] = torch.zeros(channels)
        stale[f"{prefix}.running_var"] = torch.ones(channels)
        stale[f"{prefix}.num_batches_tracked"] = torch.tensor(0)
    checkpoint = {**official, **stale}
    fresh = gen.build_cyclegan()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(checkpoint, strict=True)
    gen.load_official_state_dict(fresh, checkpoint)
    for key, value in official.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert set(checkpoint) - set(gen.adapt_official_state_dict(fresh, checkpoint)) == set(stale)
    # DataParallel's prefix is dropped too; a real mismatch still fails.
    gen.load_official_state_dict(gen.build_cyclegan(), {f"module.{k}": v for k, v in checkpoint.items()})
    broken = dict(official)
    broken.pop("model.26.bias")
    with pytest.raises(RuntimeError, match="model.26.bias"):
        gen.load_official_state_dict(gen.build_cyclegan(), broken)


def test_pix2pix_checkpoint_loads_strictly(pix2pix):
    official = pix2pix.state_dict()
    fresh = gen.build_pix2pix()
    gen.load_official_state_dict(fresh, official)
    for key, value in official.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # pre-0.4 batch-norm checkpoints have no num_batches_tracked; torch fills it in
    old = {k: v for k, v in official.items() if not k.endswith("num_batches_tracked")}
    gen.load_official_state_dict(gen.build_pix2pix(), old)


# ------------------------------------------------------------ script / ONNX parity
def test_cyclegan_scripted_and_onnx_equal_eager(cyclegan):
    wrapped = gen.ImageGenerator(cyclegan).eval()
    scripted = torch.jit.script(wrapped)
    inputs = [uint8_images(1, 3, 64, 48), uint8_images(2, 3, 32, 40, seed=1)]
    with torch.inference_mode():
        expected = [wrapped(x) for x in inputs]
        for x, e in zip(inputs, expected):
            assert e.shape == x.shape and e.dtype == torch.float32
            assert e.abs().max() <= 1.0
            torch.testing.assert_close(scripted(x), e, rtol=0, atol=SCRIPT_ATOL)
    for got, e in zip(onnx_run(wrapped, inputs[0], inputs, dynamic=True), expected):
        assert_close_scaled(got, e.numpy(), rtol=ONNX_RTOL, atol=ONNX_ATOL)


def pix2pix_spec(**options):
    from service.export.repository import build_spec

    return build_spec(zoo.get("pix2pix"), "pix2pix", [], 1, options=options)


def test_pix2pix_scripted_equals_eager():
    # the registered export form: per-image batch norm
    wrapped = zoo.get("pix2pix").wrap(randomize(gen.build_pix2pix(), seed=2), pix2pix_spec()).eval()
    x = uint8_images(1, 3, 256, 256)
    with torch.inference_mode():
        expected = wrapped(x)
        torch.testing.assert_close(torch.jit.script(wrapped)(x), expected, rtol=0, atol=SCRIPT_ATOL)
    assert expected.shape == (1, 3, 256, 256)


@pytest.mark.parametrize("batch_norm", ["per_image", "running"])
def test_pix2pix_onnx_equals_eager(batch_norm):
    # unet_256's structure (8 levels, 256x256) at a quarter of its width: the same
    # layers, a 16x smaller file to export.
    generator = gen.UnetGenerator(3, 3, 8, ngf=16, norm_layer=gen.get_norm_layer("batch"), use_dropout=True)
    spec = pix2pix_spec(batch_norm=batch_norm)
    wrapped = zoo.get("pix2pix").wrap(randomize(generator, seed=2), spec).eval()
    x = uint8_images(1, 3, 256, 256)
    with torch.inference_mode():
        expected = wrapped(x)
    (got,) = onnx_run(wrapped, x, [x], dynamic=False)
    assert_close_scaled(got, expected.numpy(), rtol=ONNX_RTOL, atol=ONNX_ATOL)


def test_wrapper_maps_uint8_to_minus_one_one(cyclegan):
    wrapped = gen.ImageGenerator(cyclegan).eval()
    x = uint8_images(1, 3, 16, 20)
    with torch.inference_mode():
        # x / 127.5 - 1 up to float32 rounding (computed as x * (1 / 127.5) - 1)
        torch.testing.assert_close(wrapped.normalize(x), x.float() / 127.5 - 1, rtol=0, atol=1e-6)
        ends = wrapped.normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2))
        torch.testing.assert_close(ends.flatten(), torch.tensor([-1.0, 1.0] * 3), rtol=0, atol=1e-6)
        assert_close_scaled(wrapped(x), cyclegan(x.float() / 127.5 - 1), rtol=1e-3, atol=1e-4)


def test_per_image_batch_norm_is_the_official_test_behaviour():
    """Official test.py keeps the model in train mode: batch norm uses the statistics of
    the (single-image) batch. Per-image normalization gives that for each image of a
    batch, whatever else is in the batch."""
    def small_unet():  # 6 levels at 64x64: the same blocks as unet_256, less compute
        return gen.UnetGenerator(3, 3, 6, ngf=16, norm_layer=gen.get_norm_layer("batch"), use_dropout=False)

    reference = randomize(small_unet(), seed=3)
    served = gen.per_image_batch_norm(randomize(small_unet(), seed=3)).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.modules())
    a = uint8_images(1, 3, 64, 64, seed=4).float() / 127.5 - 1
    b = uint8_images(1, 3, 64, 64, seed=5).float() / 127.5 - 1
    reference.train()
    with torch.no_grad():
        expected_a, expected_b = reference(a), reference(b)
        together = served(torch.cat([a, b]))
    # A batch of two against batches of one: rounding scales with the output.
    assert_close_scaled(together[:1], expected_a, rtol=1e-4, atol=1e-5)
    assert_close_scaled(together[1:], expected_b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- registry
def test_registered_generators():
    pix2pix, cyclegan = zoo.get("pix2pix"), zoo.get("cyclegan")
    for arch in (pix2pix, cyclegan):
        assert arch.task == "generation"
        assert arch.mean == (0.5, 0.5, 0.5) and arch.std == (0.5, 0.5, 0.5)
        assert arch.layout.output_names == ("generated__0",) and arch.input_name != arch.layout.output_names[0]
        assert arch.adapt_state_dict is gen.adapt_official_state_dict
    assert pix2pix.input_size == (256, 256) and pix2pix.resize_mode == "stretch"
    assert pix2pix.options == {"batch_norm": "per_image"}
    assert cyclegan.resize_mode == "none" and cyclegan.options["size_multiple"] == "4"
    # export hooks: pix2pix fixed at its input size, CycleGAN any size
    assert not pix2pix.variable_input_size and cyclegan.variable_input_size
    assert [t.dims for t in pix2pix.output_specs(0, 256, 256)] == [(3, 256, 256)]
    assert [(t.name, t.dims) for t in cyclegan.output_specs(0, 256, 256)] == [("generated__0", (3, -1, -1))]


# ------------------------------------------------------------------------ export
def test_cyclegan_exports_any_size_to_onnx(tmp_path):
    """`convserve export cyclegan --format onnx`: input and output [3, -1, -1]; the
    file runs at sizes other than the one it was checked at, equal to eager."""
    import onnxruntime as ort

    from service.export.repository import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_model("cyclegan", tmp_path, fmt="onnx", input_size=32, seed=4, max_batch_size=2)
    spec = result.spec
    assert result.name == "cyclegan_onnx" and spec.task == "generation" and spec.resize_mode == "none"
    assert spec.image_input.dims == (3, -1, -1) and spec.image_input.dtype == np.uint8
    assert [(t.name, t.dtype, t.dims) for t in spec.outputs] == [("generated__0", np.float32, (3, -1, -1))]
    assert spec.options["max_side"] == str(gen.CYCLEGAN_MAX_SIDE) and spec.output_layout == "image_nchw_tanh"
    torch.manual_seed(4)
    eager = gen.ImageGenerator(gen.build_cyclegan()).eval()
    session = ort.InferenceSession(str(result.path / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = uint8_images(1, 3, 24, 40, seed=9)
    (got,) = session.run(["generated__0"], {"images__0": x.numpy()})
    with torch.inference_mode():
        assert_close_scaled(got, eager(x).numpy(), rtol=ONNX_RTOL, atol=ONNX_ATOL)


def small_generator(path, fmt):
    """A float-input generator file (2 resnet blocks, 8 filters)."""
    torch.manual_seed(0)
    model = gen.ResnetGenerator(3, 3, 8, norm_layer=gen.get_norm_layer("instance"), n_blocks=2).eval()
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
    else:
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    return path


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_from_file_generation(tmp_path, fmt):
    from service.export import ExportError
    from service.export.files import export_from_file

    source = small_generator(tmp_path / ("g.pt" if fmt == "torchscript" else "g.onnx"), fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_from_file(source, tmp_path / "repo", task="generation", name="mine", input_size=32,
                                  labels_file=None)
    spec = result.spec
    assert spec.task == "generation" and spec.labels == () and spec.resize_mode == "stretch"
    assert spec.mean == (0.5,) * 3 and spec.std == (0.5,) * 3 and not spec.normalize_in_model
    assert spec.output_layout == "image_nchw_tanh" and spec.outputs[0].dims == (3, 32, 32)
    assert (result.path / "1" / source.name.replace(source.stem, "model")).is_file()
    other = export_from_file(source, tmp_path / "repo", task="generation", name="unit", input_size=32,
                             labels_file=None, layout="image_nchw_01", mean=(0.0,) * 3, std=(1.0,) * 3)
    assert other.spec.output_layout == "image_nchw_01" and other.spec.mean == (0.0,) * 3
    with pytest.raises(ExportError, match="--layout for generation"):
        export_from_file(source, tmp_path / "repo", task="generation", name="bad", input_size=32,
                         labels_file=None, layout="logits")


def test_from_file_generation_refuses_a_classifier(tmp_path):
    from service.export import ExportError
    from service.export.files import export_from_file

    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    source = tmp_path / "c.pt"
    torch.jit.save(torch.jit.script(classifier), str(source))
    with pytest.raises(ExportError, match=r"needs \[2, 3, 32, 32\]"):
        export_from_file(source, tmp_path / "repo", task="generation", name="c", input_size=32, labels_file=None)
    with pytest.raises(ExportError, match="needs --labels"):
        export_from_file(source, tmp_path / "repo", task="classification", name="c", input_size=32,
                         labels_file=None)
