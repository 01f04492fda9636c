"""Shared test helpers: photos, encoding, ports, scale-aware float comparison."""
from __future__ import annotations

import io
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# The repository root, for the one free_port (loadtests.run's) that tests, load tests
# and benchmarks share.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from loadtests.run import free_port  # noqa: E402,F401

# Photos shipped inside scikit-image's wheel.
PHOTO_NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
# Where size does not matter, tests use images of at most this many pixels per side.
MAX_TEST_SIDE = 320


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@lru_cache(maxsize=None)
def photo(name: str, max_side: int = MAX_TEST_SIDE) -> Image.Image:
    """A real photo from scikit-image, RGB, downscaled so its longer side <= max_side."""
    image = Image.open(skimage_data_dir() / name).convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    return image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def with_exif_orientation(image: Image.Image, orientation: int) -> bytes:
    """JPEG bytes of `image` stored so that applying EXIF `orientation` gives `image` back."""
    inverse = {
        1: lambda im: im,
        3: lambda im: im.transpose(Image.ROTATE_180),
        6: lambda im: im.transpose(Image.ROTATE_90),    # stored rotated; viewer turns 270 ccw
        8: lambda im: im.transpose(Image.ROTATE_270),
    }[orientation]
    stored = inverse(image)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def bad_request_field(error) -> str:
    """The field named by a gRPC error's BadRequest detail ("" when it has none)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    for detail in rpc_status.from_call(error).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    return ""


# TIFF field types used to build EXIF blocks by hand (TIFF 6.0, section 2).
TIFF_BYTE, TIFF_ASCII, TIFF_SHORT, TIFF_LONG, TIFF_RATIONAL = 1, 2, 3, 4, 5


def exif_block(entries, byte_order: str = "<") -> bytes:
    """An APP1 EXIF payload: "Exif\\0\\0", a TIFF header and IFD0 holding `entries`, each
    (tag, type, count, value bytes) written as given, right or wrong. Values over 4
    bytes go after the IFD, with their offset in the entry."""
    import struct

    header = (b"II" if byte_order == "<" else b"MM") + struct.pack(byte_order + "HI", 42, 8)
    data_offset = 8 + 2 + 12 * len(entries) + 4
    table, extra = b"", b""
    for tag, kind, count, value in entries:
        if len(value) <= 4:
            table += struct.pack(byte_order + "HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            table += struct.pack(byte_order + "HHII", tag, kind, count, data_offset + len(extra))
            extra += value
    return b"Exif\0\0" + header + struct.pack(byte_order + "H", len(entries)) + table + b"\0\0\0\0" + extra


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """`jpeg` with an APP1 segment holding `payload` right after its start marker."""
    import struct

    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (zlib, no Pillow encoder): uint16 [H, W] is grey,
    [H, W, 2] grey+alpha, [H, W, 3] RGB (48-bit), [H, W, 4] RGBA (64-bit)."""
    import struct
    import zlib

    samples = np.asarray(samples, dtype=np.uint16)
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    height, width = samples.shape[:2]
    rows = samples.reshape(height, width * channels).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def assert_close_scaled(got, want, rtol: float, atol: float = 0.0, err_msg: str = "") -> None:
    """``max|got - want| <= atol + rtol * max|want|``: one bound for the whole array,
    scaled by its largest finite value, as the exporter's parity check does.

    For float outputs of different kernels (ONNX Runtime vs torch, another batch size,
    another CPU), whose rounding scales with the output, not with each element: a
    per-element `assert_allclose(rtol=...)` fails on elements near zero. Shapes must
    match, and NaN/inf must sit at the same places in both."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    prefix = f"{err_msg}: " if err_msg else ""
    assert got.shape == want.shape, f"{prefix}shape {got.shape} != {want.shape}"
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=f"{prefix}non-finite values differ")
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=f"{prefix}non-finite values differ")
    if not finite.any():
        return
    diff = float(np.abs(got[finite] - want[finite]).max())
    scale = float(np.abs(want[finite]).max())
    bound = atol + rtol * scale
    assert diff <= bound, (f"{prefix}max abs diff {diff:.3g} exceeds {bound:.3g} "
                           f"(atol {atol:g} + rtol {rtol:g} x max|want| {scale:.3g})")


def served_threads(repo: Path) -> int:
    """The intra-op threads a lone request's run gets in the embedded Triton on `repo`
    (what `start_triton` gives the backends; tests call one request at a time)."""
    from service.embedded import repository_thread_counts

    return repository_thread_counts(repo).alone


@contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set to `threads` for the block, then restored.
    A reference computed with the served thread count sums in the served order, so
    results agree to the last bits (other counts split reductions otherwise, and a
    detector's in-graph NMS can then keep other near-tied rows)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cpu_profile_file(entry: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run, in this process, the model file that `entry`'s embedded CPU profile serves
    (configs/cpu.pbtxt: TorchScript through torch, or its ONNX file through ONNX
    Runtime), with the served thread count, on `inputs` in the config's input order;
    its outputs in output order."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = text_format.Parse((entry / "configs" / "cpu.pbtxt").read_text(), mc.ModelConfig())
    path = entry / "1" / config.default_model_filename
    threads = served_threads(entry.parent)
    if config.backend == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run([o.name for o in config.output], {i.name: a for i, a in zip(config.input, inputs)})
    import torch

    model = torch.jit.load(str(path)).eval()
    with torch.inference_mode(), torch_threads(threads):
        out = model(*[torch.from_numpy(a) for a in inputs])
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]
