"""convserve: serving convolutional vision models through NVIDIA Triton."""

__version__ = "0.1.0"
