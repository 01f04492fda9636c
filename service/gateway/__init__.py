"""The gateway: everything between a gRPC call and Triton (transport, data plane,
Triton client, auth, metrics, logs). Nothing here imports torch or model code.

This file imports nothing, so that one module of the package can be imported alone.
"""
