"""The gateway's Triton client: specs from the model-config RPC, inference, readiness.

Everything the gateway knows about a model comes through here, from Triton itself; no
repository is read from disk. Triton's errors become domain errors (errors.py).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from ..errors import (Cancelled, ConvserveError, DeadlineExceeded, Internal, NotFound,
                     ResourceExhausted, Unavailable)
from ..spec import ModelSpec, triton_datatype_name

log = logging.getLogger(__name__)

# gRPC limit for tensors going to and from Triton: a full batch of large images.
TRITON_MAX_MESSAGE_BYTES = 1024 * 1024 * 1024
# Health and config calls are cheap; bound them so a hung Triton cannot hang a request.
CONTROL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelStatus:
    name: str
    versions: tuple[str, ...]
    ready: bool


# Triton tells these conditions apart only by message: each comes back with status
# UNAVAILABLE (Triton's Status::Code::UNAVAILABLE, sent as gRPC UNAVAILABLE), like a
# Triton that is down. In Triton core (triton-inference-server/core, as in 2.51):
# - src/scheduler_utils.cc, PriorityQueue::PolicyQueue::Enqueue, a full queue:
#   Status(Status::Code::UNAVAILABLE, request->LogRequest() + "Exceeds maximum queue size")
# - src/dynamic_batch_scheduler.cc, the batcher thread, a request whose queue timeout
#   expired: Status(Status::Code::UNAVAILABLE, "Request timeout expired")
TRITON_QUEUE_FULL = "exceeds maximum queue size"
TRITON_QUEUE_TIMEOUT = "request timeout expired"
# - src/model_lifecycle.cc, ModelLifeCycle::GetModel, a version that exists but is not
#   loaded: Status(Status::Code::UNAVAILABLE, "'<model>' version <n> is not at ready state")
TRITON_VERSION_NOT_READY = "is not at ready state"


def _status_code(exc: InferenceServerException) -> str | None:
    """The gRPC status code's name that tritonclient carries, e.g. "RESOURCE_EXHAUSTED".

    tritonclient.grpc turns a grpc.RpcError into InferenceServerException(status=
    str(rpc_error.code())), i.e. "StatusCode.RESOURCE_EXHAUSTED". Errors it raises
    itself before any call (bad arguments) carry no status: None."""
    status = exc.status()
    return status.rsplit(".", 1)[-1] if status else None


def map_triton_error(exc: InferenceServerException, model: str) -> ConvserveError:
    """Translate a tritonclient exception into a domain error with a clean message.

    Keyed by the gRPC status code; the message is read only where Triton tells
    conditions apart by message alone (UNAVAILABLE: queue full, queue timeout, a version
    not ready, or Triton down)."""
    code = _status_code(exc)
    unavailable = code == "UNAVAILABLE"
    message = (exc.message() or "").lower() if unavailable else ""
    if code == "RESOURCE_EXHAUSTED" or TRITON_QUEUE_FULL in message:
        return ResourceExhausted(f"model {model!r} is overloaded: Triton's queue is full")
    if code == "DEADLINE_EXCEEDED" or TRITON_QUEUE_TIMEOUT in message:
        return DeadlineExceeded(f"deadline exceeded while model {model!r} was running")
    if code == "CANCELLED":
        return Cancelled("the call was cancelled")
    if code == "NOT_FOUND":
        return NotFound(f"unknown model {model!r}")
    if unavailable:
        if TRITON_VERSION_NOT_READY in message:
            return Unavailable(f"model {model!r} is not ready")
        return Unavailable("the inference server is unavailable")
    return Internal(f"inference failed for model {model!r}")


class TritonModels:
    """Async access to Triton: cached model specs, inference and readiness."""

    def __init__(self, url: str):
        self.url = url
        self._client = triton_aio.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.max_send_message_length", TRITON_MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", TRITON_MAX_MESSAGE_BYTES),
                # Re-resolve the address when connections drop, so a headless Service
                # balances over Triton pods and a restarted Triton is found again.
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.keepalive_time_ms", 30_000),
                # Reconnect quickly after a Triton restart, instead of backing off
                # for up to two minutes (gRPC's default).
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
        )
        self._specs: dict[tuple[str, str], ModelSpec] = {}
        self._known: set[str] = set()
        self._outputs: dict[tuple[str, ...], list[InferRequestedOutput]] = {}

    async def close(self) -> None:
        await self._client.close()

    # --- readiness
    async def server_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=CONTROL_TIMEOUT_S))
        except InferenceServerException:
            return False

    def forget_specs(self) -> None:
        """Drop cached specs (after Triton restarts, its models may have changed)."""
        self._specs.clear()

    def is_known(self, model: str) -> bool:
        return model in self._known

    # --- specs
    async def spec(self, model: str, version: str = "") -> ModelSpec:
        key = (model, version)
        cached = self._specs.get(key)
        if cached is not None:
            return cached
        try:
            response = await self._client.get_model_config(
                model, model_version=version, client_timeout=CONTROL_TIMEOUT_S)
        except InferenceServerException as exc:
            raise map_triton_error(exc, model) from None
        try:
            spec = ModelSpec.from_model_config(response.config)
        except (ValueError, KeyError) as exc:
            raise Internal(f"model {model!r} has no convserve spec in its config") from exc
        self._specs[key] = spec
        self._known.add(model)
        return spec

    async def models(self) -> list[ModelStatus]:
        """Every model in Triton's repository index, with its versions and readiness."""
        try:
            index = await self._client.get_model_repository_index(client_timeout=CONTROL_TIMEOUT_S)
        except InferenceServerException as exc:
            raise map_triton_error(exc, "") from None
        by_name: dict[str, list] = {}
        for entry in index.models:
            by_name.setdefault(entry.name, []).append(entry)
        statuses = []
        for name, entries in sorted(by_name.items()):
            versions = tuple(sorted({e.version for e in entries if e.version}, key=_version_key))
            ready = any(e.state == "READY" for e in entries)
            statuses.append(ModelStatus(name, versions, ready))
            self._known.add(name)
        return statuses

    # --- inference
    def _requested_outputs(self, spec: ModelSpec) -> list[InferRequestedOutput]:
        """The spec's outputs as binary-tensor requests, built once per spec (read-only
        once built, so concurrent calls share them)."""
        names = tuple(t.name for t in spec.outputs)
        outputs = self._outputs.get(names)
        if outputs is None:
            outputs = self._outputs[names] = [InferRequestedOutput(name) for name in names]
        return outputs

    async def infer(
        self,
        spec: ModelSpec,
        version: str,
        inputs: dict[str, np.ndarray],
        timeout_s: float | None,
    ) -> tuple[dict[str, np.ndarray], str]:
        """One Triton call. `inputs` maps tensor names to batched arrays; returns every
        output of the spec by name, and the model version that answered. `timeout_s` (the caller's remaining deadline) bounds
        both the gRPC call and Triton's own request timeout."""
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded("deadline exceeded before inference")
        infer_inputs = []
        for name, array in inputs.items():
            tensor = InferInput(name, list(array.shape), triton_datatype_name(array.dtype))
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        try:
            result = await self._client.infer(
                spec.name,
                infer_inputs,
                model_version=version,
                outputs=self._requested_outputs(spec),
                client_timeout=timeout_s,
                timeout=int(timeout_s * 1e6) if timeout_s is not None else None,
            )
        except InferenceServerException as exc:
            raise map_triton_error(exc, spec.name) from None
        except asyncio.CancelledError:
            raise
        outputs = {t.name: _widen(result.as_numpy(t.name)) for t in spec.outputs}
        return outputs, result.get_response().model_version


def _widen(array: np.ndarray) -> np.ndarray:
    """Half-precision outputs (float16 model files) as float32, so every decoder
    computes boxes and scores at one precision; other arrays as they are."""
    return array.astype(np.float32) if array.dtype == np.float16 else array


def _version_key(version: str):
    return (0, int(version)) if version.isdigit() else (1, version)
