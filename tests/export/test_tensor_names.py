"""Every exported tensor is named `<name>__<position>`: Triton's PyTorch (libtorch)
backend maps a TorchScript model's inputs and outputs by that index, so two outputs
ending in the same index would be read from the same tensor in production."""
from __future__ import annotations

import re

import pytest

from service.export import zoo
from service.export.repository import build_spec


@pytest.mark.parametrize("name", sorted(zoo.REGISTRY))
def test_tensor_names_carry_their_position(name):
    arch = zoo.get(name)
    labels = [f"c{i}" for i in range(max(arch.num_classes, 1))]
    spec = build_spec(arch, name, labels, max_batch_size=1)
    for tensors in (spec.inputs, spec.outputs):
        for position, tensor in enumerate(tensors):
            match = re.fullmatch(r"\w+__(\d+)", tensor.name)
            assert match and int(match.group(1)) == position, (name, [t.name for t in tensors])
