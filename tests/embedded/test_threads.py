"""The embedded backends' thread budget: the cores shared out over the model instances."""
from __future__ import annotations

import os

import pytest

from service.embedded import (THREADS_VARIABLE, Threads, available_cores, backend_threads, repository_instances,
                              thread_counts)
from service.settings import load_settings


@pytest.mark.parametrize("cores,instances,threads", [
    (2, 1, 2), (2, 7, 1), (16, 4, 4), (16, 5, 3), (1, 0, 1), (64, 1, 64)])
def test_threads_per_instance_never_oversubscribe(cores, instances, threads):
    assert backend_threads(cores, instances) == threads
    assert threads * max(1, instances) <= max(cores, max(1, instances))


def test_repository_instances_count_every_cpu_instance_group(tmp_path):
    def entry(name, body):
        (tmp_path / name / "configs").mkdir(parents=True)
        (tmp_path / name / "configs" / "cpu.pbtxt").write_text(f'name: "{name}"\n{body}')

    entry("one", 'backend: "onnxruntime"\ninstance_group { kind: KIND_CPU count: 1 }\n')
    entry("three", 'backend: "onnxruntime"\ninstance_group { kind: KIND_CPU count: 3 }\n')
    entry("unsaid", 'backend: "torchscript"\n')  # Triton's default: one instance
    (tmp_path / "not_a_model").mkdir()
    assert repository_instances(tmp_path) == 5


def test_available_cores_is_at_most_the_affinity():
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_torch_threads_setting(monkeypatch):
    assert load_settings().torch_threads == 0  # 0: shared out by the launcher
    monkeypatch.setenv("CONVSERVE_TORCH_THREADS", "3")
    assert load_settings().torch_threads == 3
    monkeypatch.setenv("CONVSERVE_TORCH_THREADS", "-1")
    with pytest.raises(ValueError, match="torch_threads"):
        load_settings()
    assert THREADS_VARIABLE == "CONVSERVE_TORCH_THREADS"


def test_explicit_threads_win_over_the_environment_over_the_adaptive_default():
    cores = available_cores()
    adaptive = Threads(shared=backend_threads(cores, 3), alone=cores)
    assert thread_counts(0, {}, 3) == adaptive
    assert thread_counts(0, {THREADS_VARIABLE: "0"}, 3) == adaptive
    assert thread_counts(0, {THREADS_VARIABLE: "5"}, 3) == Threads(5, 5)
    assert thread_counts(4, {THREADS_VARIABLE: "5"}, 3) == Threads(4, 4)
    assert not Threads(4, 4).adaptive
    assert Threads(1, 2).adaptive


def test_an_onnx_models_size_counts_its_external_data_not_a_torchscript_sibling(tmp_path):
    """What decides whether the onnxruntime backend holds a second session: a small
    model.onnx with its weights in a data file is as big as its data."""
    from service.embedded.backends.onnxruntime.model import model_bytes

    version = tmp_path / "1"
    (version / "weights").mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"\0" * 1_000)
    (version / "weights" / "tensors.bin").write_bytes(b"\0" * 300_000)
    (version / "model.pt").write_bytes(b"\0" * 50_000)  # a TorchScript entry's own file
    assert model_bytes(str(version / "model.onnx")) == 301_000
