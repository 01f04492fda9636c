"""Protobuf and gRPC code generated from protos/ at install time (see setup.py).

If this import fails, the package was not installed: run `pip install -e .`.
"""
