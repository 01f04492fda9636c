"""A real repository entry that is slow on purpose: a TorchScript classifier that burns
a fixed amount of compute inside its forward pass (TorchScript has no sleep)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from service.export.repository import write_entry
from service.spec import ModelSpec, TensorSpec

MATRIX = 256
CALIBRATION_ITERATIONS = 200
CALIBRATION_RUNS = 5


class Slow(torch.nn.Module):
    def __init__(self, iterations: int):
        super().__init__()
        self.iterations = iterations
        self.register_buffer("a", torch.randn(MATRIX, MATRIX) / MATRIX ** 0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.a
        for _ in range(self.iterations):
            x = torch.tanh(x @ self.a)
        mean = images.float().mean(dim=(1, 2, 3)) + x.mean()
        return torch.stack([mean, -mean], dim=1)


def calibrate(seconds: float) -> int:
    """Iterations that take at least about `seconds` on this machine when it is idle.

    The fastest of several timed runs is used: on a shared, busy machine a single run
    measures the neighbours too, and a model calibrated on it would be much faster
    than `seconds` once they are quiet."""
    model = Slow(CALIBRATION_ITERATIONS)
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    model(images)
    best = float("inf")
    for _ in range(CALIBRATION_RUNS):
        start = time.perf_counter()
        model(images)
        best = min(best, time.perf_counter() - start)
    return max(1, int(seconds / (best / CALIBRATION_ITERATIONS)))


def export_slow_model(repo: Path, seconds: float = 0.5, name: str = "slow", max_queue_size: int = 1,
                      max_batch_size: int = 1) -> Path:
    """One forward pass takes about `seconds`, whatever the batch size (up to
    `max_batch_size`, which Triton's dynamic batcher fills)."""
    spec = ModelSpec(
        name=name, task="classification", architecture="slow_test_model",
        inputs=(TensorSpec("images__0", np.dtype(np.uint8), (3, 32, 32)),),
        outputs=(TensorSpec("logits__0", np.dtype(np.float32), (2,)),),
        max_batch_size=max_batch_size, resize_mode="stretch", labels=("slow_a", "slow_b"))
    scripted = torch.jit.script(Slow(calibrate(seconds)).eval())
    def save(path: Path) -> float:
        torch.jit.save(scripted, str(path))
        return 0.0

    return write_entry(repo, spec, "torchscript", 1, save, max_queue_size=max_queue_size)[0]
