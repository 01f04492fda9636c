"""Model files: TorchScript, ONNX and TensorRT conversion, each checked against the
eager model before it is kept (`compare`, one scaled bound per output tensor)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..spec import ModelSpec
from . import ExportError

# Exported outputs must reproduce eager: same math, only graph-level and kernel
# differences. The bound scales with each output tensor (see `parity_bound`): kernels
# that sum in another order (another CPU's SIMD width, ONNX Runtime's own GEMM) move
# every element by about float32 rounding times the output's magnitude, not times the
# element's own, so a per-element relative check refuses correct exports on elements
# near zero (1.8e-4 on logits of ~120 is 1.5e-6 of the scale). 1e-4 of the scale is ~60x
# that, and far below what a wrong weight, channel order or normalization does (>1e-2).
PARITY_RTOL, PARITY_ATOL = 1e-4, 1e-5
ONNX_OPSET = 17


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def parity_bound(expected: torch.Tensor, rtol: float = PARITY_RTOL, atol: float = PARITY_ATOL) -> float:
    """The largest abs difference an exported output may have from eager output
    `expected` (any shape, floating point): ``atol + rtol * max|expected|`` over its
    finite elements.

    A norm-wise bound, as Torch-TensorRT's accuracy check does (torchtrtc's `check_rtol`:
    ``max|a - b| <= threshold * max|a|``), rather than the per-element
    ``|a - b| <= atol + rtol * |b|`` of `torch.allclose` and torch.onnx.verification
    (rtol 1e-3, atol 1e-7, which needs `acceptable_error_percentage` to pass real
    models): rounding differences scale with the output, not with each element."""
    return atol + rtol * _finite_scale(expected)


def _finite_scale(values: torch.Tensor) -> float:
    """max |values| over the finite elements (0.0 when there are none)."""
    finite = values[torch.isfinite(values)]
    return finite.abs().max().item() if finite.numel() else 0.0


def compare_output(expected, got, what: str) -> float:
    """Check one exported output `got` against eager `expected` (tensors or arrays of
    any shape); returns the max abs difference (0.0 when empty).

    Raises ExportError on a shape change; for integer or bool outputs (labels, counts)
    on any difference; for floating outputs on a difference beyond `parity_bound`, or
    where either side is non-finite (NaN, inf) and the other does not hold the same
    value. `what` names the output in the message, e.g. "ONNX Runtime output logits__0"."""
    e, g = torch.as_tensor(expected).detach().cpu(), torch.as_tensor(got).detach().cpu()
    if e.shape != g.shape:
        raise ExportError(f"{what} has shape {list(g.shape)}, eager has {list(e.shape)}")
    if e.numel() == 0:
        return 0.0
    if not e.is_floating_point():
        # Labels, counts, indices: exact. A float export of an integer output must round-trip.
        differs = (e.double() != g.double())
        if differs.any():
            index = int(differs.flatten().nonzero()[0])
            raise ExportError(f"{what} differs from eager in {int(differs.sum())} of {e.numel()} values "
                              f"(an integer output must match exactly; first at flat index {index}: "
                              f"{g.flatten()[index].item()} vs {e.flatten()[index].item()})")
        return 0.0
    e, g = e.double(), g.double()
    e_finite, g_finite = torch.isfinite(e), torch.isfinite(g)
    # Non-finite values must sit at the same places with the same value (NaN where NaN,
    # +inf where +inf): a NaN in the export where eager is finite is a broken export.
    same_special = (e_finite == g_finite) & (e_finite | (e.isnan() & g.isnan()) | (e == g))
    if not same_special.all():
        bad = ~same_special
        index = int(bad.flatten().nonzero()[0])
        raise ExportError(f"{what} differs from eager in non-finite values at {int(bad.sum())} of {e.numel()} "
                          f"places (first at flat index {index}: {g.flatten()[index].item()} vs "
                          f"{e.flatten()[index].item()})")
    both = e_finite & g_finite
    diff = (e[both] - g[both]).abs().max().item() if both.any() else 0.0
    bound = parity_bound(e)
    if diff > bound:
        raise ExportError(f"{what} differs from eager: max abs diff {diff:.3g} exceeds the allowed {bound:.3g} "
                          f"(atol {PARITY_ATOL:g} + rtol {PARITY_RTOL:g} x max|eager| {_finite_scale(e):.3g})")
    return diff


def compare(expected, got, what: str, names: list[str] | tuple[str, ...] | None = None) -> float:
    """Check every exported output against eager (`compare_output`, one bound per output
    tensor); returns the max abs difference over all. `names` name the outputs in
    messages (default: their index)."""
    expected, got = _as_tuple(expected), _as_tuple(got)
    if len(expected) != len(got):
        raise ExportError(f"{what} returns {len(got)} outputs, eager returns {len(expected)}")
    worst = 0.0
    for i, (e, g) in enumerate(zip(expected, got)):
        name = names[i] if names is not None and i < len(names) else str(i)
        worst = max(worst, compare_output(e, g, f"{what} output {name}"))
    return worst


def to_torchscript(wrapped: torch.nn.Module, inputs: tuple[torch.Tensor, ...], expected, path: Path,
                   names: tuple[str, ...] | None = None) -> float:
    scripted = torch.jit.script(wrapped)
    with torch.inference_mode():
        diff = compare(expected, scripted(*inputs), "TorchScript", names)
    torch.jit.save(scripted, str(path))
    reloaded = torch.jit.load(str(path))
    with torch.inference_mode():
        return max(diff, compare(expected, reloaded(*inputs), "reloaded TorchScript", names))


@contextlib.contextmanager
def _without_mha_fastpath():
    """nn.MultiheadAttention's inference fast path (`aten::_native_multi_head_attention`,
    taken without grad, as here) has no ONNX symbolic: ViT's export fails with it. The
    plain path computes the same attention from ONNX-exportable ops."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def onnx_parity(path: Path, spec: ModelSpec, inputs: tuple[torch.Tensor, ...], expected,
                what: str = "ONNX Runtime") -> float:
    """Run the ONNX file at `path` with ONNX Runtime on `inputs` (every spec input, in
    order) and `compare` its outputs with eager `expected`; `what` names the run in the
    error. Returns the max abs difference."""
    import onnxruntime as ort

    outputs = [t.name for t in spec.outputs]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(outputs, {t.name: value.numpy() for t, value in zip(spec.inputs, inputs)})
    return compare(expected, [torch.from_numpy(g) for g in got], what, outputs)


def to_onnx(wrapped: torch.nn.Module, inputs: tuple[torch.Tensor, ...], expected, path: Path,
            spec: ModelSpec) -> float:
    values = inputs
    inputs = [t.name for t in spec.inputs]
    outputs = [t.name for t in spec.outputs]
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    for tensor in spec.inputs + spec.outputs:
        for axis, dim in enumerate(tensor.dims, start=1):
            if dim < 0:
                dynamic[tensor.name][axis] = f"{tensor.name}_dim{axis}"
    with torch.inference_mode(), _without_mha_fastpath():
        torch.onnx.export(wrapped, tuple(values), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=ONNX_OPSET, dynamo=False)
    return onnx_parity(path, spec, values, expected)


def to_tensorrt(wrapped, inputs: tuple[torch.Tensor, ...], expected, path: Path, spec: ModelSpec) -> float:
    """Build a TensorRT plan from the ONNX export; needs the tensorrt package and a GPU."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("--format tensorrt needs NVIDIA TensorRT: the `tensorrt` Python package is not "
                          "installed (pip install tensorrt, on a machine with an NVIDIA GPU and driver)") from None
    if not torch.cuda.is_available():
        raise ExportError("--format tensorrt needs an NVIDIA GPU: torch sees no CUDA device here")
    onnx_path = path.with_suffix(".onnx")
    to_onnx(wrapped, inputs, expected, onnx_path, spec)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise ExportError("TensorRT could not parse the ONNX export: "
                          + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for tensor in spec.inputs:
        item = tuple(tensor.dims)
        profile.set_shape(tensor.name, (1, *item), (max(1, spec.max_batch_size // 2), *item),
                          (spec.max_batch_size, *item))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("TensorRT failed to build the engine (see its log above)")
    path.write_bytes(bytes(plan))
    onnx_path.unlink()
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(plan))
    context = engine.create_execution_context()
    device_inputs = [value.cuda().contiguous() for value in inputs]
    for tensor, device_in in zip(spec.inputs, device_inputs):
        context.set_input_shape(tensor.name, tuple(device_in.shape))
        context.set_tensor_address(tensor.name, device_in.data_ptr())
    outs = []
    for tensor in spec.outputs:
        out = torch.empty(tuple(context.get_tensor_shape(tensor.name)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(tensor.name, out.data_ptr())
        outs.append(out)
    stream = torch.cuda.Stream()
    context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return compare(expected, [o.cpu() for o in outs], "TensorRT", [t.name for t in spec.outputs])


def write_model_file(fmt: str, wrapped, inputs: tuple[torch.Tensor, ...], expected, path: Path,
                     spec: ModelSpec) -> float:
    """Write `wrapped` in `fmt` to `path`, checked against `expected` on `inputs` (the
    example values of every spec input, in order)."""
    if fmt == "torchscript":
        return to_torchscript(wrapped, inputs, expected, path, tuple(t.name for t in spec.outputs))
    if fmt == "onnx":
        return to_onnx(wrapped, inputs, expected, path, spec)
    if fmt == "tensorrt":
        return to_tensorrt(wrapped, inputs, expected, path, spec)
    raise ExportError(f"format must be torchscript, onnx or tensorrt, got {fmt!r}")
