"""The gateway: everything between a gRPC call and Triton.

A call's path reads from the module names:

- ``interceptors``: admission (draining, auth, the in-flight bound), the one place
  that maps domain errors to status codes, metrics and the access log;
- ``convert``: protobuf messages <-> plain data (with ``servicer``, the only module
  that touches convserve's messages);
- ``servicer``: one short method per RPC, proto -> plain data -> data plane -> proto;
- ``dataplane``: runs a task pipeline (``service.pipelines``) for plain request data;
- ``triton``: the Triton client (specs, inference, readiness, its errors mapped);
- ``server``: the Gateway's life cycle (TLS, health, drain, Triton polling);
- ``auth``, ``metrics``, ``logs``.

Nothing here imports torch or model code. This file imports nothing, so that one
module of the package can be imported alone.
"""
