"""What a model file says about itself: its image input (name, shape, dtype) and the
metadata its exporter wrote, read without running it.

ONNX files carry both: the graph's first input, with static or symbolic dims, and
``metadata_props``. Ultralytics' exporter (``ultralytics/engine/exporter.py``,
``Exporter.__call__`` then ``export_onnx``) writes its metadata dict there as
``meta.key, meta.value = k, str(v)``, so each value is a Python literal's text:

    task     "detect" | "classify" | "segment" | "pose" | "obb"
    names    "{0: 'person', 1: 'bicycle', ...}"    (a dict of class index -> name)
    imgsz    "[640, 640]"                            ([height, width])
    stride   "32"
    batch    "1"
    channels "3", plus author, date, version, license, docs, description, args

Ultralytics' own loader (``AutoBackend``) evaluates these strings; here they are parsed
with `ast.literal_eval`, which reads literals and nothing else. YOLOv5's exporter
writes ``stride`` and ``names`` only. A TorchScript file says nothing here: every fact
is unknown (None), and flags must give what the task needs.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ExportError

# Ultralytics' task names -> (spec task, output layout) for the tasks served from files.
ULTRALYTICS_TASKS = {"detect": ("detection", "yolov8"), "classify": ("classification", "probabilities")}
# Ultralytics' classify predict preprocessing (ultralytics/data/augment.py,
# classify_transforms with its defaults DEFAULT_MEAN (0, 0, 0), DEFAULT_STD (1, 1, 1),
# crop_fraction 1.0): Resize(imgsz) of the shorter side, CenterCrop(imgsz), x / 255.
# Classify heads apply softmax when exported, hence the ``probabilities`` layout.
ULTRALYTICS_CLASSIFY_CROP_FRACTION = 1.0
ULTRALYTICS_MEAN, ULTRALYTICS_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

# ONNX TensorProto element types of image inputs the gateway can feed.
_ONNX_INPUT_DTYPES = {1: np.float32, 10: np.float16, 2: np.uint8}


@dataclass(frozen=True)
class FileFacts:
    """What the file says. ``input_shape`` has an int per static dim and None per
    symbolic one (None overall: unknown, TorchScript); ``metadata`` the raw strings."""

    input_name: str | None = None
    input_shape: tuple[int | None, ...] | None = None
    input_dtype: np.dtype | None = None
    input_dims_text: str = ""
    metadata: dict[str, str] | None = None
    # The ONNX file's external data files, as its tensors name them (paths relative to
    # its folder, each checked to be inside it and present).
    external_data: tuple[str, ...] = ()

    def shape_text(self) -> str:
        """The input shape as it reads in messages: ``[N, 224, 224, 3]``."""
        return self.input_dims_text or "unknown"


def read_facts(source: Path, fmt: str) -> FileFacts:
    """The facts of an ONNX file (a TorchScript file has none that can be read safely,
    but is checked to be TorchScript: `check_torchscript`)."""
    if fmt != "onnx":
        check_torchscript(source)
        return FileFacts()
    import onnx

    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{source.name} is not a readable ONNX file: {exc}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise ExportError(f"{source.name} has no graph input")
    first = inputs[0]
    tensor_type = first.type.tensor_type
    dims, texts = [], []
    for k, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
            texts.append(str(dim.dim_value))
        else:
            dims.append(None)
            texts.append("N" if k == 0 else (dim.dim_param or "?"))
    dtype = _ONNX_INPUT_DTYPES.get(tensor_type.elem_type)
    if dtype is None:
        raise ExportError(f"{source.name}: input {first.name!r} has ONNX element type {tensor_type.elem_type}; "
                          "convserve feeds float32, float16 or uint8 images")
    return FileFacts(first.name, tuple(dims), np.dtype(dtype), f"[{', '.join(texts)}]",
                     {p.key: p.value for p in model.metadata_props}, external_data(model, source))


def check_torchscript(source: Path) -> None:
    """Raise ExportError unless `source` is a TorchScript archive (torch.jit.save's zip,
    which holds ``constants.pkl``), naming what it is instead: a torch.save checkpoint
    (``data.pkl`` without TorchScript's code), which only its architecture can load, or
    not a PyTorch file at all. Only the zip's table of contents is read, nothing unpickled."""
    import zipfile

    try:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise ExportError(f"{source.name} is not a TorchScript file (torch.jit.save writes a zip archive; "
                          "this is none)") from None
    if any(name.endswith("/constants.pkl") for name in names):
        return
    if any(name.endswith("/data.pkl") for name in names):
        raise ExportError(
            f"{source.name} is a torch.save checkpoint (weights or a pickled module), not TorchScript: for a "
            f"zoo architecture run `convserve export ARCH --weights {source.name}`; for your own module save it "
            "with torch.jit.save(torch.jit.trace(module, example)) or torch.onnx.export, then --from-file that")
    raise ExportError(f"{source.name} is not a TorchScript file (its archive holds no constants.pkl)")


def _tensors(graph):
    """Every TensorProto of an ONNX graph: initializers, and the tensors in node
    attributes, subgraphs (If, Loop, Scan bodies) included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def external_data(model, source: Path) -> tuple[str, ...]:
    """The external data files that the ONNX `model` read from `source` names (ONNX's
    `location` entries, relative to the file's folder), in order of first use.

    Raises ExportError for a location outside that folder (absolute, or with ``..``),
    which a repository entry cannot hold, and for a file that is not there."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    locations: dict[str, None] = {}
    for tensor in _tensors(model.graph):
        if uses_external_data(tensor):
            locations.setdefault(ExternalDataInfo(tensor).location, None)
    folder = source.resolve().parent
    for location in locations:
        path = (folder / location).resolve()
        if Path(location).is_absolute() or folder not in path.parents:
            raise ExportError(f"{source.name} keeps tensors in {location!r}, outside its folder; "
                              "only external data next to the file (or below it) can be exported")
        if not path.is_file():
            raise ExportError(f"{source.name} keeps tensors in {location!r}, which is not there "
                              f"({path} does not exist): copy it next to {source.name}")
    return tuple(locations)


@dataclass(frozen=True)
class Ultralytics:
    """Ultralytics' metadata, parsed: each field None where the file does not say.
    ``labels`` in class-index order; ``imgsz`` (height, width)."""

    task: str | None = None
    labels: tuple[str, ...] | None = None
    imgsz: tuple[int, int] | None = None
    stride: int | None = None
    batch: int | None = None


def _literal(metadata: dict[str, str], key: str, source: str):
    text = metadata.get(key)
    if text is None:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ExportError(f"{source}: metadata {key}={text[:80]!r} is not a literal") from None


def ultralytics_metadata(metadata: dict[str, str] | None, source: str) -> Ultralytics:
    """Ultralytics' keys of an ONNX file's metadata_props (see the module docstring);
    raises ExportError naming the key when a present value does not parse."""
    metadata = metadata or {}
    names = _literal(metadata, "names", source)
    labels = None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))) or not all(isinstance(v, str) for v in names.values()):
            raise ExportError(f"{source}: metadata names must map class indices 0..{len(names) - 1} to names, "
                              f"got keys {sorted(names, key=str)[:5]}...")
        labels = tuple(names[i] for i in range(len(names)))
    elif isinstance(names, (list, tuple)) and all(isinstance(v, str) for v in names):
        labels = tuple(names)
    elif names is not None:
        raise ExportError(f"{source}: metadata names is a {type(names).__name__}, not a dict of index -> name")
    imgsz = _literal(metadata, "imgsz", source)
    if isinstance(imgsz, int):
        imgsz = (imgsz, imgsz)
    if imgsz is not None and not (isinstance(imgsz, (list, tuple)) and len(imgsz) == 2
                                  and all(isinstance(v, int) and v > 0 for v in imgsz)):
        raise ExportError(f"{source}: metadata imgsz={metadata['imgsz']!r} is not [height, width]")
    ints = {}
    for key in ("stride", "batch"):
        value = _literal(metadata, key, source)
        if value is not None and not (isinstance(value, int) and value > 0):
            raise ExportError(f"{source}: metadata {key}={metadata[key]!r} is not a positive integer")
        ints[key] = value
    task = metadata.get("task")
    return Ultralytics(task=task.strip() if task else None, labels=labels,
                       imgsz=tuple(imgsz) if imgsz is not None else None, **ints)
