"""Shared execute loop of the project's python-based Triton backends.

Triton hands `execute` the requests of one dynamic batch. Requests whose inputs have
the same per-item shapes are concatenated and run in one forward pass; the outputs are
split back per request. A model without Triton batching (``max_batch_size: 0``: its
batch axis, fixed at 1, is part of its dims) runs each request alone, its arrays as
they came, batch axis included, and answers the outputs whole. A failure answers every
request of that group with an error, and the model keeps serving.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os

import numpy as np

from service.embedded import ALONE_THREADS_VARIABLE, CORE_LOCKS_VARIABLE, THREADS_VARIABLE


class CoreShare:
    """Whether a run has the cores to itself, across every stub of one Triton.

    start_triton passes the thread counts (`embedded.thread_counts`) and a lock file. A
    stub holds a POSIX record lock on one byte of that file (at its pid) while it runs;
    before a run it tries a shared lock over the whole file, which fails while any other
    stub holds its byte. The kernel drops a dead stub's lock, so a crash mid-run leaves
    nothing stale. Two runs that start at the same instant may both see themselves alone
    (they then overlap with more threads than cores until one ends): a heuristic, never a
    wrong answer. With fixed counts (settings.torch_threads), nothing is locked."""

    def __init__(self, environ=os.environ):
        self.shared = int(environ.get(THREADS_VARIABLE) or 0)
        self.alone = int(environ.get(ALONE_THREADS_VARIABLE) or 0) or self.shared
        path = environ.get(CORE_LOCKS_VARIABLE)
        self.adaptive = bool(path) and self.alone > self.shared > 0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if self.adaptive else None

    def _nobody_else_runs(self) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 0, 0)  # the whole file
        except OSError:
            return False
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 0, 0)
        return True

    @contextlib.contextmanager
    def run(self):
        """Around one forward pass; yields the intra-op threads it should use."""
        if not self.adaptive:
            yield self.shared
            return
        threads = self.alone if self._nobody_else_runs() else self.shared
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, os.getpid())
        try:
            yield threads
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, os.getpid())


class BatchedModel:
    """Base for a TritonPythonModel that runs `self.forward(list_of_arrays)`."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from service.embedded import lifetime

        lifetime.die_with_triton()
        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        self.input_names = [t["name"] for t in self.config["input"]]
        self.outputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in self.config["output"]
        ]
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        filename = self.config.get("default_model_filename") or self.default_filename
        self.path = os.path.join(args["model_repository"], args["model_version"], filename)
        self.cores = CoreShare()
        self.load(self.path)

    # subclasses: default_filename, load(path) (self.cores says the thread counts),
    # forward(list[np.ndarray], threads) -> list[np.ndarray]

    def execute(self, requests):
        pb = self.pb
        responses = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        arrays = []
        for i, request in enumerate(requests):
            inputs = [pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names]
            arrays.append(inputs)
            key = tuple(a.shape[1:] for a in inputs) if self.batched else (i,)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            try:
                if self.batched:
                    batch = [np.concatenate([arrays[i][k] for i in members]) for k in range(len(self.input_names))]
                    sizes = [arrays[i][0].shape[0] for i in members]
                else:
                    batch, sizes = arrays[members[0]], None
                with self.cores.run() as threads:
                    outputs = self.forward(batch, threads)
                if len(outputs) != len(self.outputs):
                    raise RuntimeError(f"model returned {len(outputs)} outputs, config declares {len(self.outputs)}")
                offsets = np.cumsum([0] + sizes) if sizes else None
                for j, i in enumerate(members):
                    tensors = []
                    for (name, dtype), out in zip(self.outputs, outputs):
                        part = out[offsets[j]:offsets[j + 1]] if offsets is not None else out
                        tensors.append(pb.Tensor(name, np.ascontiguousarray(part.astype(dtype, copy=False))))
                    responses[i] = pb.InferenceResponse(output_tensors=tensors)
            except Exception as exc:  # answer with an error, keep the model alive
                for i in members:
                    responses[i] = pb.InferenceResponse(
                        output_tensors=[], error=pb.TritonError(f"{type(exc).__name__}: {exc}"))
        return responses
