"""Checkpoints whose tensors have the wrong shapes: one ExportError naming every
mismatched tensor with both shapes (beside missing and unexpected keys), for every zoo
architecture (one per family of torchvision's classifiers), and exit code 2 from
`convserve export` (no traceback)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from service.export import zoo
from service.export import ExportError
from service.export.checkpoints import apply_state_dict


def _corrupted_key(state: dict) -> tuple[str, list[int]]:
    """The tensor to corrupt and its wrong shape: a grayscale stem (3 input channels
    -> 1), as in the issue, where the model has one; else one more row in the first
    matrix or kernel."""
    for key, value in state.items():
        if value.is_floating_point() and value.dim() == 4 and value.shape[1] == 3:
            return key, [value.shape[0], 1, *value.shape[2:]]
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2)
    return key, [state[key].shape[0] + 1, *state[key].shape[1:]]


# The classifiers the zoo had before it took torchvision's whole list: all kept.
HAND_LISTED = {"alexnet", "vgg11", "vgg16", "vgg16_bn", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101"}


def covered() -> list[str]:
    """Every architecture, except that of torchvision's other classifiers only the smallest
    of each family (regnet, vit, swin_v2, mnasnet, ...): loading is the same code for a
    family, and building all ~80 (up to 644M parameters) takes minutes."""
    import torchvision

    def size(name: str) -> int:
        return next(iter(torchvision.models.get_model_weights(name))).meta["num_params"]

    families = {}
    for name in sorted(zoo.REGISTRY):
        if zoo.get(name).task == "classification" and name not in HAND_LISTED:
            family = re.match(r"[a-z]+(_v\d)?", name).group(0)
            families[family] = min(families.get(family, name), name, key=size)
    return sorted(name for name in zoo.REGISTRY if zoo.get(name).task != "classification"
                  or name in HAND_LISTED or name in families.values())


@pytest.mark.parametrize("arch_name", covered())
def test_wrong_shape_is_an_export_error_naming_key_and_both_shapes(arch_name):
    arch = zoo.get(arch_name)
    torch.manual_seed(0)
    model = arch.build(arch.num_classes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key, wrong = _corrupted_key(state)
    right = list(state[key].shape)
    state[key] = torch.zeros(wrong, dtype=state[key].dtype)
    with pytest.raises(ExportError) as info:
        apply_state_dict(model, state, arch)
    message = str(info.value)
    assert f"checkpoint does not match {arch_name}" in message
    assert f"mismatched shapes: {key}: checkpoint {wrong} vs model {right}" in message
    assert "missing keys" not in message and "unexpected keys" not in message


def test_missing_unexpected_and_mismatched_are_listed_together():
    arch = zoo.get("resnet18")
    torch.manual_seed(0)
    model = arch.build(1000)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    state["layer2.0.bn1.running_var"] = torch.ones(64)
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ExportError) as info:
        apply_state_dict(model, state, arch)
    assert str(info.value) == (
        "checkpoint does not match resnet18: missing keys: layer1.0.conv1.weight; unexpected keys: extra.weight; "
        "mismatched shapes: conv1.weight: checkpoint [64, 1, 7, 7] vs model [64, 3, 7, 7], "
        "layer2.0.bn1.running_var: checkpoint [64] vs model [128]")


def test_matching_checkpoint_still_loads():
    arch = zoo.get("resnet18")
    torch.manual_seed(0)
    state = arch.build(10).state_dict()
    torch.manual_seed(1)
    model = arch.build(10)
    apply_state_dict(model, state, arch)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_cli_exits_2_naming_the_mismatched_tensor(tmp_path):
    torch.manual_seed(0)
    state = zoo.get("resnet18").build(1000).state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grayscale stem
    torch.save(state, tmp_path / "gray.pth")
    done = subprocess.run([sys.executable, "-m", "service.cli", "export", "resnet18", "--weights",
                           str(tmp_path / "gray.pth"), "--repo", str(tmp_path / "repo")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert ("convserve export: error: checkpoint does not match resnet18: mismatched shapes: "
            "conv1.weight: checkpoint [64, 1, 7, 7] vs model [64, 3, 7, 7]") in done.stderr
    assert not (tmp_path / "repo" / "resnet18" / "1").exists()
