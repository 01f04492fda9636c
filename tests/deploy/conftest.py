"""Fixtures of the deployment tests: the real Helm engine and the loaded chart."""
from __future__ import annotations

import pytest

from ._deploy import CHART


@pytest.fixture(scope="session")
def helm():
    """helm-python-sdk: Helm's own Go SDK (libhelm_c) through ctypes; no helm binary."""
    return pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install helm-python-sdk)")


@pytest.fixture(scope="session")
def chart(helm):
    with helm.Chart.load(CHART) as loaded:
        yield loaded
