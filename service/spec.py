"""The model spec: the single source of truth for how a model is fed and read.

The exporter renders a `ModelSpec` into Triton model configs (`config.pbtxt` and
`configs/cpu.pbtxt`); the gateway rebuilds the same `ModelSpec` from Triton's
model-config RPC. Nothing here imports torch, and no spec value is copied into gateway
code: tensor names, dtypes, dims, resize mode, mean/std, labels and output layout all
travel in the config (tensors as tensors, the rest as `convserve.*` parameters).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterable

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from .ops.resize import RESAMPLE_FILTERS, RESIZE_MODES
from .pipelines import layouts

PARAM_PREFIX = "convserve."
# `ModelSpec.weights` of a model exported with random (seeded) weights.
SEEDED = "seeded"

TASKS = (
    "classification",
    "detection",
    "semantic_segmentation",
    "instance_segmentation",
    "generation",
)
FORMATS = ("torchscript", "onnx", "tensorrt")
# How the image input lays out its axes after the item axis: channels first (what the
# zoo exports) or last (Keras / TensorFlow exports).
INPUT_LAYOUTS = ("NCHW", "NHWC")

# Triton's config data types <-> numpy dtypes.
_TYPE_TO_NP = {
    mc.TYPE_BOOL: np.bool_,
    mc.TYPE_UINT8: np.uint8,
    mc.TYPE_INT8: np.int8,
    mc.TYPE_INT16: np.int16,
    mc.TYPE_INT32: np.int32,
    mc.TYPE_INT64: np.int64,
    mc.TYPE_FP16: np.float16,
    mc.TYPE_FP32: np.float32,
    mc.TYPE_FP64: np.float64,
}
_NP_TO_TYPE = {np.dtype(v): k for k, v in _TYPE_TO_NP.items()}

# Production (NGC container) platforms, and the embedded CPU profile's python-based
# backends (service/embedded/backends/<name>/model.py), per export format.
PRODUCTION_PLATFORM = {
    "torchscript": "pytorch_libtorch",
    "onnx": "onnxruntime_onnx",
    "tensorrt": "tensorrt_plan",
}
CPU_BACKEND = {"torchscript": "torchscript", "onnx": "onnxruntime"}
MODEL_FILENAME = {"torchscript": "model.pt", "onnx": "model.onnx", "tensorrt": "model.plan"}
# How long Triton's dynamic batcher holds a request for others to join it (see
# `to_model_config`).
DYNAMIC_BATCHING_DELAY_US = 0


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype and per-item dims (no batch axis;
    -1 marks a variable dim)."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]

    def to_config_fields(self) -> dict:
        """Name and data type; dims are the spec's to write (`ModelSpec.config_dims`)."""
        return {"name": self.name, "data_type": triton_type(self.dtype)}


def triton_type(dtype) -> int:
    try:
        return _NP_TO_TYPE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no Triton data type for numpy dtype {dtype}") from None


def triton_datatype_name(dtype) -> str:
    """The KServe-v2 datatype string ('FP32', 'UINT8', ...) for a numpy dtype."""
    return mc.DataType.Name(triton_type(dtype))[len("TYPE_"):]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the gateway needs to feed a model and read its answer.

    Images enter as `inputs[0]`, with C=3 in `channel_order`, channels first (dims
    [3, H, W]) or last ([H, W, 3]) as `input_layout` says. When that input is uint8,
    the model normalizes inside itself; when it is floating point (float32 or float16),
    the gateway feeds ``(pixel / 255 - mean) / std`` in that dtype.

    Tensor dims here are always per item. `fixed_batch` 1 marks a model file whose
    batch axis is fixed at 1: its Triton entry has ``max_batch_size: 0`` and that axis
    written in every tensor's dims (`to_model_config` adds it, `from_model_config`
    strips it), and the gateway sends it one item per call.
    """

    name: str
    task: str
    architecture: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 8
    resize_mode: str = "resize_center_crop"
    # For resize_center_crop: the shorter side is resized to this before the crop.
    resize_size: int = 0
    # The resize filter (torchvision's InterpolationMode name) of resize_center_crop and
    # stretch: what the weights' own preset uses. Configs without it mean bilinear.
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"
    output_layout: str = "logits"
    labels: tuple[str, ...] = ()
    # Task-specific options (thresholds, default top-k, ...), all strings.
    options: dict[str, str] = field(default_factory=dict)
    input_layout: str = "NCHW"
    # 0: Triton batches along a leading axis (up to max_batch_size); 1: the model's
    # batch axis is fixed at 1 and max_batch_size is 0 (see the class docstring).
    fixed_batch: int = 0
    # Where imported values came from, e.g. {"labels": "file-metadata"} or
    # {"labels": "--labels"}: a record for operators, never read to serve.
    sources: dict[str, str] = field(default_factory=dict)
    # Where the weights came from (`SEEDED`, published weights' name, or a checkpoint's
    # file name and sha256 prefix); "" when not recorded (configs written before it).
    weights: str = ""
    # Filled in by the gateway from Triton; not part of the exported config.
    version_policy: str = "latest"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in RESAMPLE_FILTERS:
            raise ValueError(f"interpolation must be one of {tuple(RESAMPLE_FILTERS)}, got {self.interpolation!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if not self.inputs or not self.outputs:
            raise ValueError("a model spec needs at least one input and one output")
        if self.input_layout not in INPUT_LAYOUTS:
            raise ValueError(f"input_layout must be one of {INPUT_LAYOUTS}, got {self.input_layout!r}")
        dims = self.image_input.dims
        if len(dims) != 3 or dims[self._channel_axis] != 3:
            want = "[3, H, W]" if self.input_layout == "NCHW" else "[H, W, 3]"
            raise ValueError(f"image input of a {self.input_layout} model must be {want}, got {list(dims)}")
        if self.fixed_batch not in (0, 1):
            raise ValueError(f"fixed_batch must be 0 (batched by Triton) or 1, got {self.fixed_batch}")
        if (self.max_batch_size == 0) != (self.fixed_batch == 1) or self.max_batch_size < 0:
            raise ValueError(f"max_batch_size {self.max_batch_size} with fixed_batch {self.fixed_batch}: a model "
                             "without Triton batching (max_batch_size 0) is one whose batch axis is fixed at 1 "
                             "(fixed_batch 1), and only it")

    # --- derived views
    @property
    def image_input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def _channel_axis(self) -> int:
        return 0 if self.input_layout == "NCHW" else 2

    @property
    def input_height(self) -> int:
        return self.image_input.dims[1 if self.input_layout == "NCHW" else 0]

    @property
    def input_width(self) -> int:
        return self.image_input.dims[2 if self.input_layout == "NCHW" else 1]

    @property
    def items_per_call(self) -> int:
        """The most items one Triton call carries: the fixed batch, or max_batch_size."""
        return self.fixed_batch or self.max_batch_size

    @property
    def normalize_in_model(self) -> bool:
        return np.dtype(self.image_input.dtype) == np.uint8

    @cached_property
    def layout(self) -> layouts.Layout:
        """The registry entry of `output_layout`; raises layouts.LayoutError."""
        return layouts.get(self.output_layout)

    @cached_property
    def settings(self) -> layouts.Settings:
        """`options` parsed and validated against the layout's typed options, once per
        spec (the gateway caches specs); raises layouts.BadModelOption naming the key,
        or layouts.LayoutError for an unknown layout."""
        return self.layout.parse_options(self.options)

    def with_name(self, name: str) -> "ModelSpec":
        return replace(self, name=name)

    # --- config rendering (exporter side)
    def parameters(self) -> dict[str, str]:
        params = {
            "task": self.task,
            "architecture": self.architecture,
            "resize_mode": self.resize_mode,
            "resize_size": str(self.resize_size),
            "interpolation": self.interpolation,
            "mean": ",".join(repr(float(v)) for v in self.mean),
            "std": ",".join(repr(float(v)) for v in self.std),
            "channel_order": self.channel_order,
            "input_layout": self.input_layout,
            "output_layout": self.output_layout,
            "labels": json.dumps(list(self.labels)),
        }
        if self.fixed_batch:
            params["fixed_batch"] = str(self.fixed_batch)
        if self.weights:
            params["weights"] = self.weights
        params.update({f"option.{k}": str(v) for k, v in self.options.items()})
        params.update({f"source.{k}": str(v) for k, v in self.sources.items()})
        return {PARAM_PREFIX + key: value for key, value in params.items()}

    def config_dims(self, tensor: TensorSpec) -> list[int]:
        """A tensor's dims as Triton's config holds them: with the fixed batch first
        when the model has one."""
        return [self.fixed_batch, *tensor.dims] if self.fixed_batch else list(tensor.dims)

    def to_model_config(
        self,
        profile: str,
        fmt: str = "torchscript",
        *,
        labels_file: str | None = None,
        version_policy: str = "latest",
        instance_count: int = 1,
        max_queue_size: int = 0,
        cpu_fmt: str | None = None,
    ) -> mc.ModelConfig:
        """Render the `production` (NGC tritonserver) or `cpu` (embedded) profile.

        Both profiles carry identical inputs, outputs and parameters; they differ only in
        platform/backend, model file, instance placement and warm-up. The production
        profile runs the `fmt` file; the cpu profile runs the `cpu_fmt` file (default
        `fmt`): an entry exported as TorchScript also holds its ONNX export, which the
        embedded CPU profile runs with ONNX Runtime (faster on CPU) while production
        keeps libtorch.
        """
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        config = mc.ModelConfig(name=self.name, max_batch_size=self.max_batch_size)
        config.default_model_filename = MODEL_FILENAME[fmt]
        if profile == "production":
            config.platform = PRODUCTION_PLATFORM[fmt]
            # KIND_AUTO: GPU when the node has one, CPU otherwise; TensorRT needs a GPU.
            kind = mc.ModelInstanceGroup.KIND_GPU if fmt == "tensorrt" else mc.ModelInstanceGroup.KIND_AUTO
            config.instance_group.add(kind=kind, count=instance_count)
            warmup = config.model_warmup.add(name="zeros", batch_size=1)
            for tensor in self.inputs:
                warmup.inputs[tensor.name].CopyFrom(
                    mc.ModelWarmup.Input(data_type=triton_type(tensor.dtype), dims=[
                        d if d > 0 else 64 for d in self.config_dims(tensor)], zero_data=True))
        elif profile == "cpu":
            cpu_fmt = cpu_fmt or fmt
            if cpu_fmt not in CPU_BACKEND:
                raise ValueError(f"format {cpu_fmt!r} has no CPU profile")
            config.backend = CPU_BACKEND[cpu_fmt]
            config.default_model_filename = MODEL_FILENAME[cpu_fmt]
            config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instance_count)
        else:
            raise ValueError(f"profile must be production or cpu, got {profile!r}")
        if self.max_batch_size > 0:
            # Gather concurrent requests into one forward pass, without delay: the batch
            # is what queued while the instance was busy, so batches fill under load and
            # a lone request (one caller) starts at once. A delay would hold every
            # lone request that long for nothing (2 ms measured at concurrency 1,
            # docs/performance.md).
            config.dynamic_batching.SetInParent()
            config.dynamic_batching.max_queue_delay_microseconds = DYNAMIC_BATCHING_DELAY_US
            if max_queue_size > 0:
                # Past this many queued requests Triton refuses at once; the gateway
                # answers RESOURCE_EXHAUSTED instead of letting latency grow unbounded.
                config.dynamic_batching.default_queue_policy.max_queue_size = max_queue_size
        if version_policy == "all":
            config.version_policy.all.SetInParent()
        else:
            config.version_policy.latest.num_versions = 1
        for tensor in self.inputs:
            config.input.add(**tensor.to_config_fields(), dims=self.config_dims(tensor))
        for i, tensor in enumerate(self.outputs):
            out = config.output.add(**tensor.to_config_fields(), dims=self.config_dims(tensor))
            if i == 0 and labels_file and self.task == "classification":
                out.label_filename = labels_file
        for key, value in self.parameters().items():
            config.parameters[key].string_value = value
        return config

    # --- config parsing (gateway side)
    @classmethod
    def from_model_config(cls, config: mc.ModelConfig) -> "ModelSpec":
        """Rebuild the spec from a Triton ModelConfig; raises ValueError when the config
        was not written by convserve's exporter (no `convserve.task` parameter)."""
        params = {
            key[len(PARAM_PREFIX):]: value.string_value
            for key, value in config.parameters.items()
            if key.startswith(PARAM_PREFIX)
        }
        if "task" not in params:
            raise ValueError(f"model {config.name!r} has no {PARAM_PREFIX}task parameter")

        fixed_batch = int(params.get("fixed_batch") or 0)

        def tensors(items: Iterable) -> tuple[TensorSpec, ...]:
            out = []
            for t in items:
                dims = tuple(int(d) for d in t.dims)
                if fixed_batch:
                    if dims[:1] != (fixed_batch,):
                        raise ValueError(f"model {config.name!r}: tensor {t.name} has dims {list(dims)}, "
                                         f"not led by its fixed batch {fixed_batch}")
                    dims = dims[1:]
                out.append(TensorSpec(t.name, np.dtype(_TYPE_TO_NP[t.data_type]), dims))
            return tuple(out)

        def floats(text: str, default):
            return tuple(float(v) for v in text.split(",")) if text else default

        policy = config.version_policy.WhichOneof("policy_choice") or "latest"
        return cls(
            name=config.name,
            task=params["task"],
            architecture=params.get("architecture", ""),
            inputs=tensors(config.input),
            outputs=tensors(config.output),
            max_batch_size=config.max_batch_size,
            resize_mode=params.get("resize_mode", "resize_center_crop"),
            resize_size=int(params.get("resize_size") or 0),
            interpolation=params.get("interpolation") or "bilinear",
            mean=floats(params.get("mean", ""), (0.0, 0.0, 0.0)),
            std=floats(params.get("std", ""), (1.0, 1.0, 1.0)),
            channel_order=params.get("channel_order", "RGB"),
            output_layout=params.get("output_layout", "logits"),
            labels=tuple(json.loads(params.get("labels") or "[]")),
            options={k[len("option."):]: v for k, v in params.items() if k.startswith("option.")},
            input_layout=params.get("input_layout") or "NCHW",
            fixed_batch=fixed_batch,
            sources={k[len("source."):]: v for k, v in params.items() if k.startswith("source.")},
            weights=params.get("weights", ""),
            version_policy=policy,
        )
