"""Box ops against slow, obvious references written out here, torchvision's CPU NMS loop
transcribed box by box (float32 arithmetic in its order, compared with the threshold in
double, as its C++ kernel does)."""
from __future__ import annotations


import numpy as np
import pytest

from service.ops import boxes
from references import F32, reference_iou, reference_nms, reference_order

def reference_batched_nms(b, s, classes, threshold, nms=reference_nms) -> np.ndarray:
    """Per-class NMS (torchvision's _batched_nms_vanilla), then all kept by score."""
    kept = set()
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        kept.update(members[nms(b[members], s[members], threshold)].tolist())
    return np.array([i for i in reference_order(s) if i in kept], np.int64)


def vectorized_reference_nms(b, s, threshold) -> np.ndarray:
    """The same greedy loop, one kept box at a time against all later boxes at once:
    still obviously the C++ loop, fast enough for 10k boxes."""
    b = np.asarray(b, F32)
    order = np.array(reference_order(s), np.int64)
    b = b[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    alive = np.ones(len(b), bool)
    keep = []
    for i in range(len(b)):
        if not alive[i]:
            continue
        keep.append(order[i])
        w = np.maximum(F32(0), np.minimum(b[i, 2], b[i + 1:, 2]) - np.maximum(b[i, 0], b[i + 1:, 0]))
        h = np.maximum(F32(0), np.minimum(b[i, 3], b[i + 1:, 3]) - np.maximum(b[i, 1], b[i + 1:, 1]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            ovr = inter / (area[i] + area[i + 1:] - inter)
        alive[i + 1:] &= ~(ovr.astype(np.float64) > threshold)
    return np.array(keep, np.int64)


def random_boxes(rng, n, image=640.0, min_side=4.0, max_side=160.0, grid=None):
    """Detector-like boxes; with ``grid``, integer corners on a coarse grid, so that many
    pairs sit exactly on simple IoUs (1/2, 1/3, ...) and scores tie."""
    if grid:
        xy = rng.integers(0, grid, (n, 2))
        wh = rng.integers(0, grid // 2 + 1, (n, 2))  # zero sides included: degenerate boxes
        b = np.concatenate([xy, xy + wh], 1).astype(F32)
        s = rng.integers(0, 4, n).astype(F32) / 4
    else:
        xy = rng.uniform(0, image, (n, 2))
        wh = rng.uniform(min_side, max_side, (n, 2))
        b = np.concatenate([xy, xy + wh], 1).astype(F32)
        s = rng.random(n).astype(F32)
    return b, s


@pytest.fixture(params=[8, 16, 32, 64], ids=lambda t: f"tile{t}")
def tile(request, monkeypatch):
    """Run with one tile size forced, so that every word width is exercised."""
    monkeypatch.setattr(boxes, "_TILES", (request.param,))
    return request.param


# --- exact threshold ------------------------------------------------------------------

def test_iou_exactly_at_threshold_is_kept_and_just_above_is_suppressed():
    a = [0, 0, 3, 1]  # area 3
    b = [1, 0, 4, 1]  # inter 2, union 4: IoU exactly 0.5 in float32
    nudged = [0, 0, np.nextafter(F32(3), F32(4)), 1]  # a, one ulp wider: IoU 0.5000001
    assert reference_iou(a, b) == F32(0.5)
    assert F32(0.5) < reference_iou(nudged, b) < F32(0.5000002)
    scores = np.array([0.9, 0.8], F32)
    np.testing.assert_array_equal(boxes.nms(np.array([a, b], F32), scores, 0.5), [0, 1])
    np.testing.assert_array_equal(boxes.nms(np.array([nudged, b], F32), scores, 0.5), [0])
    np.testing.assert_array_equal(boxes.box_iou(np.array([a, nudged], F32), np.array([b], F32))[:, 0],
                                  [reference_iou(a, b), reference_iou(nudged, b)])


@pytest.mark.parametrize("threshold,other,kept", [
    # float32(1/10) = 0.10000000149 > 0.1 as a double: torchvision suppresses,
    (0.1, [9, 0, 10, 1], [0]),
    # float32(7/10) = 0.69999998808 < 0.7 as a double: torchvision keeps.
    (0.7, [0, 0, 7, 1], [0, 1]),
])
def test_threshold_is_compared_in_double_like_torchvision(threshold, other, kept):
    a = [0, 0, 10, 1]
    assert reference_iou(a, other) == F32(threshold)
    got = boxes.nms(np.array([a, other], F32), np.array([0.9, 0.8], F32), threshold)
    np.testing.assert_array_equal(got, kept)


# --- against the reference ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_reference_on_grid_boxes(tile, seed, threshold):
    rng = np.random.default_rng(seed)
    b, s = random_boxes(rng, int(rng.integers(1, 120)), grid=12)
    np.testing.assert_array_equal(boxes.nms(b, s, threshold), reference_nms(b, s, threshold))


_REFERENCES: dict = {}  # the reference does not depend on the tile size: once per case


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("classes", [1, 3, 80])
def test_batched_nms_matches_reference(tile, seed, classes):
    rng = np.random.default_rng(100 + seed)
    n = 400
    b, s = random_boxes(rng, n) if seed % 2 else random_boxes(rng, n, grid=16)
    c = rng.integers(0, classes, n)
    if (seed, classes) not in _REFERENCES:
        _REFERENCES[seed, classes] = reference_batched_nms(b, s, c, 0.5)
    np.testing.assert_array_equal(boxes.batched_nms(b, s, c, 0.5), _REFERENCES[seed, classes])


@pytest.mark.parametrize("seed", range(3))
def test_long_classes_are_solved_block_by_block(monkeypatch, seed):
    monkeypatch.setattr(boxes, "_BLOCK", 16)  # 300 boxes: long classes and short ones
    rng = np.random.default_rng(200 + seed)
    b, s = random_boxes(rng, 300, image=200.0, grid=None if seed else 14)
    c = rng.integers(0, 4, 300)  # classes of ~60 boxes: several blocks of 16 each
    c[:40] = 9
    c[40:45] = 10  # one class short of a block: solved in tiles beside the long ones
    np.testing.assert_array_equal(boxes.batched_nms(b, s, c, 0.45), reference_batched_nms(b, s, c, 0.45))
    np.testing.assert_array_equal(boxes.nms(b, s, 0.45), reference_nms(b, s, 0.45))


@pytest.mark.parametrize("classes", [1, 80])
def test_10k_boxes_match_reference(classes):
    rng = np.random.default_rng(classes)
    b, s = random_boxes(rng, 10_000)
    c = rng.integers(0, classes, len(b))
    ours = boxes.batched_nms(b, s, c, 0.5)
    np.testing.assert_array_equal(ours, reference_batched_nms(b, s, c, 0.5, nms=vectorized_reference_nms))


def test_float64_boxes_are_computed_in_float64():
    rng = np.random.default_rng(7)
    b, s = random_boxes(rng, 150, image=100.0)
    b = b.astype(np.float64) + rng.uniform(0, 1e-3, b.shape)
    np.testing.assert_array_equal(boxes.nms(b, s, 0.4), reference_nms(b, s, 0.4))


# --- degenerate inputs ----------------------------------------------------------------

def test_empty_inputs():
    empty = np.zeros((0, 4), F32)
    for keep in (boxes.nms(empty, np.zeros(0, F32), 0.5),
                 boxes.batched_nms(empty, np.zeros(0, F32), np.zeros(0, np.int64), 0.5),
                 boxes.batched_nms(empty, np.zeros(0, F32), np.zeros(0, np.int64), 0.5, class_agnostic=True)):
        assert keep.dtype == np.int64 and keep.shape == (0,)
    assert boxes.box_area(empty).shape == (0,)
    assert boxes.box_iou(empty, np.ones((3, 4), F32)).shape == (0, 3)
    assert boxes.box_iou(np.ones((2, 4), F32), empty).shape == (2, 0)


def test_zero_area_boxes_never_suppress_and_iou_is_zero_not_nan():
    point = [5, 5, 5, 5]
    line = [0, 5, 10, 5]
    big = [0, 0, 10, 10]
    b = np.array([point, point, line, big, point], F32)
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5], F32)
    # Identical zero-area boxes: 0/0 = NaN in torchvision's loop, never > threshold.
    np.testing.assert_array_equal(boxes.nms(b, s, 0.5), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(boxes.nms(b, s, 0.0), reference_nms(b, s, 0.0))
    iou = boxes.box_iou(b, b)
    assert not np.isnan(iou).any()
    assert iou[0, 1] == 0 and iou[3, 3] == 1
    np.testing.assert_array_equal(boxes.box_area(b), [0, 0, 0, 100, 0])


def test_equal_scores_keep_index_order():
    b = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 1, 10, 11], [20, 21, 30, 31]], F32)
    s = np.full(5, 0.5, F32)
    np.testing.assert_array_equal(boxes.nms(b, s, 0.5), [0, 2])
    np.testing.assert_array_equal(boxes.batched_nms(b, s, np.array([1, 0, 1, 0, 1]), 0.5), [0, 1, 2])


def test_nan_scores_sort_first_and_negative_zero_ties_zero():
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], F32)
    s = np.array([-0.0, np.nan, 0.0, 0.0], F32)
    np.testing.assert_array_equal(boxes.nms(b, s, 0.5), [1, 3])
    np.testing.assert_array_equal(boxes.nms(b, s.astype(np.float64), 0.5), [1, 3])


def test_class_agnostic_is_plain_nms():
    rng = np.random.default_rng(3)
    b, s = random_boxes(rng, 300)
    c = rng.integers(0, 80, len(b))
    np.testing.assert_array_equal(boxes.batched_nms(b, s, c, 0.5, class_agnostic=True), boxes.nms(b, s, 0.5))
    assert len(boxes.batched_nms(b, s, c, 0.5)) >= len(boxes.nms(b, s, 0.5))


def test_suppression_chain_resolves_greedily():
    # Each box overlaps the next with IoU 0.54 and the one after with 0.25: greedy keeps
    # every other box, which takes one fixed-point round per box of a block.
    n = 600
    x = np.arange(n, dtype=F32) * F32(0.3)
    b = np.stack([x, np.zeros(n, F32), x + 1, np.ones(n, F32)], 1)
    s = np.linspace(1, 0, n, dtype=F32)
    keep = boxes.nms(b, s, 0.5)
    np.testing.assert_array_equal(keep, np.arange(0, n, 2))


def test_box_iou_and_area_match_reference():
    rng = np.random.default_rng(11)
    a, _ = random_boxes(rng, 30, grid=10)
    c, _ = random_boxes(rng, 20, grid=10)
    expected = np.array([[reference_iou(p, q) for q in c] for p in a], F32)
    expected[np.isnan(expected)] = 0
    np.testing.assert_array_equal(boxes.box_iou(a, c), expected)
    np.testing.assert_array_equal(boxes.box_area(a), (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))


@pytest.mark.parametrize("call", [
    lambda: boxes.nms(np.zeros((3, 5), F32), np.zeros(3, F32), 0.5),
    lambda: boxes.nms(np.zeros((3, 4), F32), np.zeros(2, F32), 0.5),
    lambda: boxes.batched_nms(np.zeros((3, 4), F32), np.zeros(3, F32), np.zeros(4, np.int64), 0.5),
    lambda: boxes.box_iou(np.zeros(4, F32), np.zeros((1, 4), F32)),
])
def test_bad_shapes_raise_with_the_shape(call):
    with pytest.raises(ValueError, match=r"got \["):
        call()


def slow_select(boxes, scores, labels, score_threshold, iou_threshold, max_detections, class_ids):
    """The API's order, spelled out: threshold, class filter, per-class greedy NMS, top-N."""
    ok = [i for i in range(len(scores)) if scores[i] > score_threshold and (not class_ids or labels[i] in class_ids)]
    ok = np.array(ok, np.int64)
    kept = reference_batched_nms(boxes[ok], scores[ok], labels[ok], iou_threshold)
    return ok[kept][:max_detections].tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("class_ids", [(), (1, 3)])
def test_select_detections_matches_the_api_order(seed, class_ids):
    rng = np.random.default_rng(seed)
    n = 300
    xy = rng.uniform(0, 200, (n, 2))
    b = np.concatenate([xy, xy + rng.uniform(1, 60, (n, 2))], axis=1).astype(np.float32)
    s = rng.uniform(0, 1, n).astype(np.float32)
    labels = rng.integers(0, 5, n)
    got = boxes.select_detections(b, s, labels, score_threshold=0.3, iou_threshold=0.5,
                                  max_detections=20, class_ids=list(class_ids))
    expected = slow_select(b, s, labels, 0.3, 0.5, 20, list(class_ids))
    assert got.tolist() == expected
    assert 0 < len(got) <= 20


def test_clip_boxes_clips_to_the_image():
    b = np.array([[-5, -1, 30, 300], [10, 10, 20, 20]], np.float32)
    np.testing.assert_array_equal(boxes.clip_boxes(b, 25, 100), [[0, 0, 25, 100], [10, 10, 20, 20]])
