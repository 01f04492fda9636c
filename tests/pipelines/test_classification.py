"""Classification postprocessing against a slow, obvious reference."""
from __future__ import annotations

import math

import numpy as np
import pytest

from service.errors import InvalidArgument
from service.pipelines import classification
from references import sample_spec


def reference_top_k(logits: list[float], k: int):
    exp = [math.exp(v - max(logits)) for v in logits]
    total = sum(exp)
    probs = [e / total for e in exp]
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))[:k]
    return [(i, probs[i]) for i in order]


def test_postprocess_matches_reference():
    spec = sample_spec()
    logits = np.array([[0.5, 2.0, -1.0], [3.0, 3.0, 0.0]], dtype=np.float32)
    results = classification.postprocess({"logits__0": logits}, spec, 2)
    for row, labels in zip(logits.tolist(), results):
        expected = reference_top_k(row, 2)
        assert [l.index for l in labels] == [i for i, _ in expected]
        assert [l.name for l in labels] == [spec.labels[i] for i, _ in expected]
        np.testing.assert_allclose([l.score for l in labels], [p for _, p in expected], rtol=1e-6)


def test_top_k_defaults_and_limits():
    spec = sample_spec()
    assert classification.resolve_top_k(None, spec) == 3  # the model's option
    assert classification.resolve_top_k(10, spec) == 10   # clamped later to the class count
    with pytest.raises(InvalidArgument) as info:
        classification.resolve_top_k(0, spec)
    assert info.value.field == "top_k"
