"""The export parity check: a bound that scales with each output tensor accepts the
rounding differences of other kernels (another CPU, ONNX Runtime) on large outputs,
and still refuses real mistakes (a wrong layer, swapped channels, a missing
normalization), whichever kernels torch picks (ATEN_CPU_CAPABILITY)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import FINAL_LAYER_SCALE
from service.export import zoo
from service.export.formats import PARITY_ATOL, PARITY_RTOL, compare, parity_bound
from service.export import ExportError
from service.export.repository import export_model

# float32 rounding seen across kernels, relative to an output's scale: the issue's
# 1.8e-4 on logits of ~120 (AVX2 EPYC vs the developer's machine) is 1.5e-6.
KERNEL_ROUNDING = 2e-6
# A difference that no kernel change makes: 1% of the output's scale.
MISTAKE = 1e-2


def large_logits(seed: int = 0, shape=(2, 1000), scale: float = 120.0) -> torch.Tensor:
    """Logits like the e2e stack's (final layer x40): max |value| == scale, and many
    elements near zero."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator)
    logits = logits / logits.abs().max() * scale
    logits.view(-1)[:10] = torch.tensor([0.0, 1e-7, -1e-6, 3e-5, -2e-4, 1e-3, 0.0, 5e-6, -5e-6, 1e-8])
    return logits


def rounding_noise(like: torch.Tensor, relative: float, sign: float, seed: int = 1) -> torch.Tensor:
    """A difference of at most `relative` x max|like| on every element (near-zero ones
    included), all of sign `sign` or of mixed signs (sign 0)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(like.shape, generator=generator)
    if sign == 0:
        noise = noise * 2 - 1
    return sign * noise * relative * like.abs().max() if sign else noise * relative * like.abs().max()


# ---------------------------------------------------------------- compare itself
@pytest.mark.parametrize("sign", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("scale", [1.0, 120.0, 5000.0])
def test_kernel_rounding_on_large_outputs_is_accepted(sign, scale):
    eager = large_logits(scale=scale)
    exported = eager + rounding_noise(eager, KERNEL_ROUNDING, sign)
    if scale >= 120:
        # What the per-element check refused: a near-zero element moved by ~2e-4.
        assert not torch.allclose(exported, eager, rtol=1e-3, atol=1e-5)
    diff = compare(eager, exported, "ONNX Runtime", ["logits__0"])
    assert 0 < diff <= parity_bound(eager)


@pytest.mark.parametrize("sign", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("scale", [1.0, 120.0, 5000.0])
def test_mistake_sized_difference_is_refused_naming_output_diff_and_bound(sign, scale):
    eager = large_logits(scale=scale)
    exported = eager.clone()
    exported.view(-1)[500] += (1 if sign >= 0 else -1) * MISTAKE * scale
    with pytest.raises(ExportError) as info:
        compare(eager, exported, "ONNX Runtime", ["logits__0"])
    message = str(info.value)
    assert "ONNX Runtime output logits__0 differs from eager" in message
    assert f"max abs diff {MISTAKE * scale:.3g}" in message
    assert f"allowed {PARITY_ATOL + PARITY_RTOL * scale:.3g}" in message


def test_bound_is_per_output_tensor():
    """A large output does not widen the bound of a small one beside it."""
    logits, probabilities = large_logits(scale=120.0), torch.rand(2, 10)
    compare((logits, probabilities), (logits + 1e-3, probabilities), "TorchScript", ["logits__0", "probs__1"])
    with pytest.raises(ExportError, match="output probs__1 differs"):
        compare((logits, probabilities), (logits, probabilities + 1e-3), "TorchScript", ["logits__0", "probs__1"])


def test_bound_on_an_all_zero_output_is_atol():
    zeros = torch.zeros(3, 4)
    compare(zeros, zeros + PARITY_ATOL / 2, "ONNX Runtime")
    with pytest.raises(ExportError, match="output 0 differs"):
        compare(zeros, zeros + PARITY_ATOL * 2, "ONNX Runtime")


def test_empty_outputs_compare_equal_and_shapes_must_match():
    assert compare(torch.zeros(2, 0, 4), torch.zeros(2, 0, 4), "TorchScript") == 0.0
    with pytest.raises(ExportError, match=r"output boxes__0 has shape \[2, 1, 4\], eager has \[2, 0, 4\]"):
        compare(torch.zeros(2, 0, 4), torch.zeros(2, 1, 4), "TorchScript", ["boxes__0"])
    with pytest.raises(ExportError, match="returns 1 outputs, eager returns 2"):
        compare((torch.zeros(1), torch.zeros(1)), (torch.zeros(1),), "TorchScript")


def test_integer_outputs_must_match_exactly():
    labels = torch.tensor([[3, 7, 1000000]], dtype=torch.int64)
    count = torch.tensor([[3]], dtype=torch.int32)
    assert compare((labels, count), (labels.clone(), count.clone()), "ONNX Runtime") == 0.0
    with pytest.raises(ExportError, match=r"output labels__2 differs from eager in 1 of 3 values"):
        compare(labels, labels + torch.tensor([[0, 0, 1]]), "ONNX Runtime", ["labels__2"])
    # A large count does not loosen anything: off by one is off.
    with pytest.raises(ExportError, match="output count__3 differs"):
        compare(count, count + 1, "ONNX Runtime", ["count__3"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_export_where_eager_is_finite_is_refused(bad):
    eager = large_logits()
    exported = eager.clone()
    exported[1, 7] = bad
    with pytest.raises(ExportError, match="output logits__0 differs from eager in non-finite values at 1 of 2000"):
        compare(eager, exported, "ONNX Runtime", ["logits__0"])
    # ... and the other way round.
    with pytest.raises(ExportError, match="non-finite"):
        compare(exported, eager, "ONNX Runtime", ["logits__0"])


def test_non_finite_values_in_both_at_the_same_places_are_equal():
    eager = large_logits()
    eager[0, 3], eager[0, 4], eager[1, 5] = float("nan"), float("inf"), -float("inf")
    compare(eager, eager + rounding_noise(eager.nan_to_num(0, 0, 0), KERNEL_ROUNDING, 0.0), "TorchScript")
    flipped = eager.clone()
    flipped[0, 4] = -float("inf")
    with pytest.raises(ExportError, match="non-finite"):
        compare(eager, flipped, "TorchScript")


# ----------------------------------------------------- through a real export
class Mismatched(torch.nn.Module):
    """The exported module: `wrapped` in eager, `other` once scripted or traced for
    ONNX, so that the export differs from eager the way a real mistake would."""

    def __init__(self, wrapped: torch.nn.Module, other: torch.nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.other = other

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self.other(images)
        return self.wrapped(images)


class Flipped(torch.nn.Module):
    """BGR instead of RGB."""

    def __init__(self, wrapped: torch.nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapped(images.flip(1))


class Unnormalized(torch.nn.Module):
    """Pixels / 255 fed straight to the model: mean and std forgotten."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.float() / 255.0)


class Rounded(torch.nn.Module):
    """The model's own output moved by a kernel-rounding-sized amount (relative to its
    scale), everywhere and of one sign."""

    def __init__(self, wrapped: torch.nn.Module, relative: float):
        super().__init__()
        self.wrapped = wrapped
        self.relative = relative

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.wrapped(images)
        return out + self.relative * out.abs().max()


def _perturbed_layer(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with one layer's weights off by 1% (a stale or wrong layer)."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        weight = other.layer3[0].conv1.weight
        weight.add_(0.01 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    return other


MISTAKES = {
    "wrong_layer": lambda model, spec, wrapped: zoo.NormalizedModel(_perturbed_layer(model), spec.mean, spec.std),
    "swapped_channels": lambda model, spec, wrapped: Flipped(wrapped),
    "missing_normalization": lambda model, spec, wrapped: Unnormalized(model),
}


def _large_logit_checkpoint(path, seed: int, scale: float = FINAL_LAYER_SCALE, num_classes: int = 10):
    """A seeded resnet18 checkpoint with the final layer scaled up, like the e2e
    stack's: logits of magnitude ~80 (x40), ~800 (x400)."""
    torch.manual_seed(seed)
    model = zoo.get("resnet18").build(num_classes)
    with torch.no_grad():
        model.fc.weight.mul_(scale)
        model.fc.bias.mul_(scale)
    torch.save(model.state_dict(), path)
    return path


def _with_exported(monkeypatch, make_other):
    arch = zoo.get("resnet18")

    def wrap(model, spec):
        wrapped = arch.wrap(model, spec)
        return Mismatched(wrapped, make_other(model, spec, wrapped))

    monkeypatch.setitem(zoo.REGISTRY, "resnet18", dataclasses.replace(arch, wrap=wrap))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_real_mistakes_in_the_exported_module_are_refused(tmp_path, monkeypatch, mistake, fmt):
    weights = _large_logit_checkpoint(tmp_path / "w.pth", seed=7)
    _with_exported(monkeypatch, MISTAKES[mistake])
    what = {"torchscript": "TorchScript", "onnx": "ONNX Runtime"}[fmt]
    with pytest.raises(ExportError, match=f"{what} output logits__0 differs from eager: max abs diff .* exceeds "
                                          "the allowed"):
        export_model("resnet18", tmp_path / "repo", weights=weights, fmt=fmt, input_size=32)
    assert not list((tmp_path / "repo").glob("*/1"))


@pytest.mark.parametrize("relative, accepted", [(KERNEL_ROUNDING, True), (-KERNEL_ROUNDING, True),
                                                (MISTAKE, False), (-MISTAKE, False)])
def test_rounding_sized_export_difference_is_accepted_and_mistake_sized_refused(tmp_path, monkeypatch,
                                                                                relative, accepted):
    weights = _large_logit_checkpoint(tmp_path / "w.pth", seed=3)
    _with_exported(monkeypatch, lambda model, spec, wrapped: Rounded(wrapped, relative))
    if accepted:
        result = export_model("resnet18", tmp_path / "repo", weights=weights, input_size=32)
        assert result.max_abs_diff > 0  # the export did differ, by a rounding-sized amount
    else:
        with pytest.raises(ExportError, match="TorchScript output logits__0 differs from eager"):
            export_model("resnet18", tmp_path / "repo", weights=weights, input_size=32)


# Seeds of large-output checkpoints; the final layer x40 (as the e2e stack's) and x400.
SEEDS = [0, 1, 2, 1234]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [FINAL_LAYER_SCALE, 10 * FINAL_LAYER_SCALE])
def test_large_output_checkpoints_export_on_any_kernels(tmp_path, seed, scale, fmt):
    """Seeded checkpoints with large logits (1000 classes, so some sit near zero, as in
    the issue) export in both formats; `.ci/run` runs this again under
    ATEN_CPU_CAPABILITY=default, so torch's kernels differ from the ones this
    machine picks by default."""
    weights = _large_logit_checkpoint(tmp_path / "w.pth", seed=seed, scale=scale, num_classes=1000)
    result = export_model("resnet18", tmp_path / "repo", weights=weights, fmt=fmt, input_size=64)
    # Logits reach ~2 x scale, so this is at most half the bound (in practice ~1/100).
    assert result.max_abs_diff < PARITY_RTOL * scale


class TinyAttention(torch.nn.Module):
    """uint8 images -> 16 tokens -> nn.MultiheadAttention (ViT's attention) -> 3 logits."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 8)
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(2).transpose(1, 2)
        x = self.embed(x)
        x = self.attention(x, x, x, need_weights=False)[0]
        return self.head(x.mean(dim=1))


def test_attention_exports_to_onnx(tmp_path):
    """Without grad, nn.MultiheadAttention takes a fused fast path that ONNX cannot export
    (ViT's export failed with it); the ONNX export takes the plain path, and leaves the
    fast path setting as it found it."""
    from references import sample_spec
    from service.export.formats import to_onnx

    torch.manual_seed(0)
    model = TinyAttention().eval()
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        expected = model(images)
    assert to_onnx(model, (images,), expected, tmp_path / "model.onnx", sample_spec()) <= parity_bound(expected)
    assert torch.backends.mha.get_fastpath_enabled()
