"""The torch side: models into a Triton model repository.

    <repo>/<name>/config.pbtxt        production profile (NGC tritonserver)
    <repo>/<name>/configs/cpu.pbtxt   embedded CPU profile (python-based backends)
    <repo>/<name>/<version>/model.pt  the model file: model.pt, model.onnx or model.plan
    <repo>/<name>/labels.txt          one label per line

Two sources: a zoo architecture plus an optional checkpoint
(`repository.export_model`), or an already exported TorchScript/ONNX file, its task,
layout and input read from the file where it says and from flags where it does not
(`files.export_from_file`). The parts:

- `zoo/`: the architectures, how to build each and what it exports;
- `checkpoints`: reading state dicts and matching them strictly to a model, labels;
- `formats`: TorchScript / ONNX / TensorRT conversion and the parity check against eager;
- `repository`: the spec of an export and the entry writer;
- `files`: `--from-file`, each file checked by its layout's registry entry;
- `origins`: what a file says about itself (its input, Ultralytics' metadata);
- `tvshim`, `_tvops`: torchvision's compiled ops on CPU torch.

Importing this package imports nothing heavy; its modules import torch. The gateway
never imports it.
"""
from __future__ import annotations


class ExportError(Exception):
    """A user-facing export failure (bad checkpoint, mismatched classes, parity); the
    CLI exits with status 2 and the message."""
