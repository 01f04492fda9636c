"""The shim's CPU kernels for torchvision::nms and torchvision::roi_align against slow,
obvious transcriptions of torchvision's C++ CPU kernels (one RoI, bin and sample at a
time, in the kernel's scalar type), and through a TorchScript-compiled detector."""
from __future__ import annotations

import sys

import pytest
import torch

from service.export import _tvops
from references import reference_roi_align


# --- roi_align reference: roi_align_kernel.cpp + roi_align_common.h, line by line ------

def make_rois(generator, count, batch, image_h, image_w, dtype=torch.float32):
    """RoIs in image coordinates: inside, partly outside, fully outside, tiny, inverted."""
    x1 = torch.rand(count, generator=generator) * image_w * 1.3 - image_w * 0.2
    y1 = torch.rand(count, generator=generator) * image_h * 1.3 - image_h * 0.2
    w = torch.rand(count, generator=generator) * image_w * 0.8 - 2
    h = torch.rand(count, generator=generator) * image_h * 0.8 - 2
    index = torch.randint(0, batch, (count,), generator=generator).to(torch.float32)
    return torch.stack([index, x1, y1, x1 + w, y1 + h], 1).to(dtype)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roi_align_matches_reference(aligned, sampling_ratio, dtype):
    generator = torch.Generator().manual_seed(sampling_ratio * 10 + aligned)
    features = torch.randn(3, 2, 9, 11, generator=generator, dtype=dtype)
    rois = make_rois(generator, 12, batch=3, image_h=36, image_w=44, dtype=dtype)
    rois[0] = torch.tensor([2, 0, 0, 44, 36], dtype=dtype)  # the whole image, last batch item
    rois[1] = torch.tensor([1, 50, 50, 60, 60], dtype=dtype)  # fully outside
    rois[2] = torch.tensor([0, 30, 20, 10, 5], dtype=dtype)  # inverted
    for scale, pooled in [(0.25, (3, 2)), (1 / 3, (2, 4))]:
        ours = _tvops.roi_align(features, rois, scale, *pooled, sampling_ratio, aligned)
        expected = reference_roi_align(features, rois, scale, *pooled, sampling_ratio, aligned)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_roi_align_adaptive_grids_sort_out_empty_ones():
    # Inverted RoIs get a grid side <= 0 (zeros out); here one with grid (3, -3) next to
    # one with (2, 1), which a naive (gh * 4 + gw) grouping key would confuse.
    features = torch.randn(1, 2, 20, 20, generator=torch.Generator().manual_seed(6))
    rois = torch.tensor([[0, 0, 0, 3.0, 8.0], [0, 10, 0, 1.0, 10.0], [0, 0, 0, 9.0, 1.0]])
    ours = _tvops.roi_align(features, rois, 1.0, 4, 3, -1, True)
    torch.testing.assert_close(ours, reference_roi_align(features, rois, 1.0, 4, 3, -1, True), rtol=0, atol=0)
    assert not ours[1].any()


def test_roi_align_single_row_and_column_maps():
    generator = torch.Generator().manual_seed(5)
    for shape in [(1, 3, 1, 7), (1, 3, 6, 1), (1, 1, 1, 1)]:
        features = torch.randn(*shape, generator=generator)
        rois = make_rois(generator, 6, batch=1, image_h=shape[2] * 2, image_w=shape[3] * 2)
        for aligned in (False, True):
            ours = _tvops.roi_align(features, rois, 0.5, 2, 3, -1, aligned)
            torch.testing.assert_close(ours, reference_roi_align(features, rois, 0.5, 2, 3, -1, aligned),
                                       rtol=0, atol=0)


def test_roi_align_channels_last_input_and_chunks(monkeypatch):
    monkeypatch.setattr(_tvops, "_ROI_ALIGN_CHUNK", 40)  # a handful of RoIs per step
    generator = torch.Generator().manual_seed(9)
    features = torch.randn(2, 4, 8, 8, generator=generator)
    rois = make_rois(generator, 20, batch=2, image_h=16, image_w=16)
    expected = reference_roi_align(features, rois, 0.5, 2, 2, 2, True)
    ours = _tvops.roi_align(features.to(memory_format=torch.channels_last), rois, 0.5, 2, 2, 2, True)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_roi_align_half_is_close():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(1, 3, 10, 10, generator=generator)
    rois = make_rois(generator, 8, batch=1, image_h=10, image_w=10)
    ours = _tvops.roi_align(features.half(), rois.half(), 1.0, 3, 3, 2, False)
    expected = reference_roi_align(features.half().float(), rois.half().float(), 1.0, 3, 3, 2, False)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours.float(), expected, rtol=1e-3, atol=1e-3)


def test_roi_align_empty_inputs():
    features = torch.randn(2, 5, 8, 8)
    out = _tvops.roi_align(features, torch.zeros(0, 5), 1.0, 7, 7, 2, False)
    assert out.shape == (0, 5, 7, 7) and out.dtype == torch.float32
    assert _tvops.roi_align(torch.zeros(2, 0, 8, 8), torch.tensor([[0.0, 1, 1, 4, 4]]), 1.0, 2, 2, 2,
                            False).shape == (1, 0, 2, 2)


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(1, 1, 4, 4), torch.zeros(2, 4)), "Tensor\\[K, 5\\]"),
    ((torch.zeros(1, 1, 4, 4), torch.zeros(2, 5, dtype=torch.float64)), "same type"),
    ((torch.zeros(1, 1, 4, 4), torch.tensor([[1.0, 0, 0, 2, 2]])), "batch index 1.0"),
])
def test_roi_align_rejects_bad_inputs(args, message):
    with pytest.raises(RuntimeError, match=message):
        _tvops.roi_align(*args, 1.0, 2, 2, 2, False)


# --- nms reference: nms_kernel.cpp, line by line ------------------------------------------

def reference_nms(dets, scores, threshold):
    """The slow transcription of nms_kernel.cpp that tests/ops/test_boxes.py checks
    service.ops.boxes against, applied to the same tensors."""
    from references import reference_nms as loop

    return torch.from_numpy(loop(dets.numpy(), scores.numpy(), threshold))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_matches_reference(seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    n = 80
    xy = torch.randint(0, 12, (n, 2), generator=generator)
    wh = torch.randint(0, 7, (n, 2), generator=generator)  # zero sides: degenerate boxes
    dets = torch.cat([xy, xy + wh], 1).to(dtype)
    scores = (torch.randint(0, 5, (n,), generator=generator) / 4).to(dtype)  # many ties
    for threshold in (0.0, 0.1, 0.5, 0.7):
        ours = _tvops.nms(dets, scores, threshold)
        assert ours.dtype == torch.int64
        torch.testing.assert_close(ours, reference_nms(dets, scores, threshold), rtol=0, atol=0)


def test_nms_empty_and_bad_inputs():
    assert _tvops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    with pytest.raises(RuntimeError, match="4 elements"):
        _tvops.nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(RuntimeError, match="same number"):
        _tvops.nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(RuntimeError, match="same type"):
        _tvops.nms(torch.zeros(3, 4), torch.zeros(3, dtype=torch.float64), 0.5)
    with pytest.raises(RuntimeError, match="not implemented"):
        _tvops.nms(torch.zeros(3, 4, dtype=torch.float16), torch.zeros(3, dtype=torch.float16), 0.5)


# --- through torchvision and TorchScript ------------------------------------------------

@pytest.fixture(scope="module")
def torchvision():
    from service.export import tvshim

    tvshim.install()
    import torchvision

    return torchvision


def test_torchvision_ops_dispatch_to_the_shim(torchvision):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 8, 8, generator=generator)
    rois = make_rois(generator, 5, batch=2, image_h=16, image_w=16)
    torch.testing.assert_close(torch.ops.torchvision.roi_align(features, rois, 0.5, 2, 2, 2, True),
                               _tvops.roi_align(features, rois, 0.5, 2, 2, 2, True), rtol=0, atol=0)
    dets = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    assert torchvision.ops.nms(dets, torch.tensor([0.5, 0.9, 0.1]), 0.5).tolist() == [1, 2]
    if _shim_active():
        with pytest.raises(NotImplementedError, match="roi_pool"):
            torch.ops.torchvision.roi_pool(features, rois, 0.5, 2, 2)


def test_eager_roi_align_uses_the_shim_kernel(torchvision):
    # torchvision.ops.roi_align bound `_has_ops` by name when it was imported; tvshim
    # patches that copy, otherwise eager roi_align would take torchvision's pure-Python
    # fallback through torch.compile (half a minute of compiling, no out-of-map rule).
    if _shim_active():
        assert sys.modules["torchvision.ops.roi_align"]._has_ops()
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(1, 3, 8, 8, generator=generator)
    rois = make_rois(generator, 5, batch=1, image_h=8, image_w=8)
    torch.testing.assert_close(torchvision.ops.roi_align(features, rois, (2, 2), 1.0, 2, False),
                               _tvops.roi_align(features, rois, 1.0, 2, 2, 2, False), rtol=0, atol=0)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_agrees_with_torchvisions_python_version(torchvision, sampling_ratio, aligned):
    # torchvision's own pure-Python roi_align (its fallback, used here uncompiled) is an
    # independent check for RoIs inside the map; it rounds in another order, and it
    # has no rule for samples beyond the border, so only in-map RoIs are compared.
    python_roi_align = sys.modules["torchvision.ops.roi_align"]._roi_align.__wrapped__
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 4, 12, 14, generator=generator)
    xy = torch.rand(10, 2, generator=generator) * torch.tensor([40.0, 30.0])
    wh = torch.rand(10, 2, generator=generator) * 20 + 1
    far = torch.tensor([55.0, 47.0])
    rois = torch.cat([torch.randint(0, 2, (10, 1), generator=generator).float(), xy,
                      torch.minimum(xy + wh, far)], 1)
    torch.testing.assert_close(_tvops.roi_align(features, rois, 0.25, 3, 3, sampling_ratio, aligned),
                               python_roi_align(features, rois, 0.25, 3, 3, sampling_ratio, aligned),
                               rtol=0, atol=1e-6)


def _shim_active() -> bool:
    from service.export import tvshim

    return bool(tvshim._state["shimmed"])


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads waiting on each other
    made this test several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_scripted_detector_matches_eager(torchvision, one_thread):
    torch.manual_seed(0)
    # min/max_size keep the 240x320 image as it is (the default resizes it to 800x1067),
    # which keeps this test to seconds; the ops see the same kinds of inputs either way.
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, min_size=240, max_size=320).eval()
    scripted = torch.jit.script(model)
    image = torch.rand(3, 240, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model([image])[0]
        _, compiled = scripted([image])
    compiled = compiled[0]
    assert len(eager["boxes"]) > 0, "seeded weights should give some detections at threshold 0"
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=0)
