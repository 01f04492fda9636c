"""The gateway's Triton client: specs from the model-config RPC, inference, readiness.

Everything the gateway knows about a model comes through here, from Triton itself; no
repository is read from disk. Triton's errors become domain errors (errors.py).
"""
from __future__ import annotations

import asyncio
import difflib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Sequence

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


# An unknown model's error names at most this many of the served models.
LISTED_MODELS = 12


def unknown_model(model: str, served: Sequence[str] | None) -> NotFound:
    """NotFound for `model`, with the closest served name (difflib's ratio >= 0.6) and the
    served names (the first LISTED_MODELS, sorted); `served` None: not known (Triton's
    index could not be read), nothing listed."""
    message = f"unknown model {model!r}"
    if served is None:
        return NotFound(message)
    names = sorted(served)
    close = difflib.get_close_matches(model, names, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    if not names:
        return NotFound(message + " (no model is ready)")
    more = len(names) - LISTED_MODELS
    listed = ", ".join(names[:LISTED_MODELS]) + (f" and {more} more" if more > 0 else "")
    return NotFound(f"{message} (ready: {listed})")


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


# ------------------------------------------------------------------ shared memory
# Regions are sized in powers of two from 1 MiB, so a few sizes serve every call.
SHM_MIN_REGION_BYTES = 1024 * 1024
# Tensors start at multiples of this in a region (a cache line).
SHM_ALIGN = 64
# Registered regions kept for reuse; past this, a released region is destroyed.
SHM_MAX_POOLED_BYTES = 512 * 1024 * 1024
# A new region must leave this much of /dev/shm free: a tmpfs that runs full faults a
# process that writes into its pages (SIGBUS), so calls fall back to gRPC first.
SHM_HEADROOM_BYTES = 64 * 1024 * 1024
SHM_DIR = "/dev/shm"
# Every gateway's region names start with this (then its pid and a random tag).
SHM_REGION_PREFIX = "convserve_"
# A failed or cancelled call's region is destroyed this long after, never reused: Triton
# may still be writing that request's outputs into it.
RETIRE_AFTER_S = 120.0


@dataclass
class _Region:
    name: str
    size: int
    segment: shared_memory.SharedMemory  # mapped here; its /dev/shm name already unlinked

    def write(self, array: np.ndarray, offset: int) -> None:
        np.ndarray(array.shape, array.dtype, buffer=self.segment.buf, offset=offset)[...] = array

    def read(self, dtype: np.dtype, shape: list[int], offset: int) -> np.ndarray:
        """A copy: the region goes back to the pool for the next call."""
        return np.ndarray(shape, dtype, buffer=self.segment.buf, offset=offset).copy()

    def close(self) -> None:
        try:
            self.segment.close()
        except BufferError:  # a view still exists somewhere: the mapping goes with it
            pass


class SharedMemoryPool:
    """System shared-memory regions registered with a Triton on the same host (Triton's
    system shared-memory extension; segments from Python's multiprocessing.shared_memory): a
    call's input tensors are written into a region, and Triton writes its outputs
    there, so neither travels through protobuf and gRPC. For a 640x640 detector that is
    1.2 MB in and 2.8 MB out per image, which the gateway's event loop otherwise spends
    milliseconds framing and parsing (docs/performance.md).

    Each call holds its own region, so calls never share one. Regions are registered
    once and kept for reuse, up to SHM_MAX_POOLED_BYTES. `acquire` answers None (the
    call then goes over gRPC) when /dev/shm has too little room. A segment's name is
    unlinked as soon as Triton has mapped it (at registration), so nothing is left in
    /dev/shm however the gateway ends; the memory goes when both sides unmap. Regions
    that Triton still holds for a gateway that died unannounced are unregistered by the
    next one (`clear`, when Triton turns ready; `_owner_gone`)."""

    def __init__(self, client):
        self._client = client
        self._free: dict[int, list[_Region]] = {}
        self._retired: list[tuple[float, _Region]] = []
        self._prefix = f"{SHM_REGION_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._serial = 0

    @staticmethod
    def capacity(nbytes: int) -> int:
        return max(SHM_MIN_REGION_BYTES, 1 << (max(1, nbytes) - 1).bit_length())

    async def acquire(self, nbytes: int) -> _Region | None:
        await self._purge_retired()
        size = self.capacity(nbytes)
        free = self._free.get(size)
        if free:
            return free.pop()
        try:
            room = os.statvfs(SHM_DIR)
        except OSError:
            return None
        if room.f_bavail * room.f_frsize < size + SHM_HEADROOM_BYTES:
            return None
        self._serial += 1
        name = f"{self._prefix}_{self._serial}"
        try:
            segment = shared_memory.SharedMemory(name=name, create=True, size=size)
        except OSError as exc:
            log.warning("no shared memory region; this call goes over gRPC", extra={"reason": str(exc)})
            return None
        try:
            await self._client.register_system_shared_memory(name, "/" + name, size,
                                                             client_timeout=CONTROL_TIMEOUT_S)
        except InferenceServerException:
            # Triton is down or restarting: the call goes over gRPC and gets its answer there.
            segment.close()
            return None
        finally:
            # Registered or not, the name is no longer needed: Triton mapped the region.
            segment.unlink()
        return _Region(name, size, segment)

    def retire(self, region: _Region) -> None:
        """Take back the region of a call that failed or was cancelled: Triton may still
        be running that request and write its outputs there, so the region is not reused
        and is destroyed only after RETIRE_AFTER_S."""
        self._retired.append((time.monotonic(), region))

    async def _purge_retired(self) -> None:
        now = time.monotonic()
        while self._retired and now - self._retired[0][0] > RETIRE_AFTER_S:
            await self._destroy(self._retired.pop(0)[1])

    async def release(self, region: _Region) -> None:
        pooled = sum(r.size for rs in self._free.values() for r in rs)
        if pooled + region.size <= SHM_MAX_POOLED_BYTES:
            self._free.setdefault(region.size, []).append(region)
        else:
            await self._destroy(region)

    async def clear(self) -> None:
        """Destroy every pooled region (after Triton restarts, its registrations are
        gone), and unregister the regions Triton still holds for a gateway that is gone."""
        regions = [r for rs in self._free.values() for r in rs] + [r for _, r in self._retired]
        self._free.clear()
        self._retired.clear()
        for region in regions:
            await self._destroy(region)
        try:
            status = await self._client.get_system_shared_memory_status(client_timeout=CONTROL_TIMEOUT_S)
            for name in status.regions:
                if not name.startswith(self._prefix) and _owner_gone(name):
                    await self._client.unregister_system_shared_memory(name, client_timeout=CONTROL_TIMEOUT_S)
        except InferenceServerException:
            pass  # Triton is down: its registrations went with it

    async def _destroy(self, region: _Region) -> None:
        try:
            await self._client.unregister_system_shared_memory(region.name, client_timeout=CONTROL_TIMEOUT_S)
        except InferenceServerException:
            pass  # Triton is gone or restarted: nothing registered to undo
        region.close()


def _owner_gone(name: str) -> bool:
    """Whether region `name` (``convserve_<pid>_<tag>_<n>``) belongs to a gateway that
    has ended: its pid is not running here, or is this process's own under another tag
    (a restarted container's gateway gets the same pid again). A region of another
    naming, or of a live gateway, is left alone."""
    if not name.startswith(SHM_REGION_PREFIX):
        return False
    pid = name[len(SHM_REGION_PREFIX):].split("_", 1)[0]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _aligned(nbytes: int) -> int:
    return -(-nbytes // SHM_ALIGN) * SHM_ALIGN


# Triton's answer when a registered region is unknown to it (e.g. it restarted):
# core/src/shared_memory_manager.cc, "Unable to find shared memory region: '<name>'".
TRITON_SHM_UNKNOWN = "unable to find shared memory region"


class TritonModels:
    """Async access to Triton: cached model specs, inference and readiness. With
    `shared_memory`, tensors go through system shared memory (`SharedMemoryPool`; the
    gateway and Triton must share a host and its /dev/shm)."""

    def __init__(self, url: str, shared_memory: bool = False):
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
        self._shm = SharedMemoryPool(self._client) if shared_memory else None

    async def close(self) -> None:
        if self._shm is not None:
            await self._shm.clear()
        await self._client.close()

    # --- readiness
    async def server_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=CONTROL_TIMEOUT_S))
        except InferenceServerException:
            return False

    async def forget_specs(self) -> None:
        """Drop cached specs and shared-memory registrations (after Triton restarts, its
        models may have changed and it knows no region)."""
        self._specs.clear()
        if self._shm is not None:
            await self._shm.clear()

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
            if _status_code(exc) == "NOT_FOUND":
                if version and model in self._known:
                    raise NotFound(f"model {model!r} has no version {version!r}") from None
                if not version:
                    raise unknown_model(model, await self.ready_names()) from None
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

    async def ready_names(self) -> list[str] | None:
        """The names of the models that are ready; None when Triton cannot say."""
        try:
            return [status.name for status in await self.models() if status.ready]
        except ConvserveError:
            return None

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
        region = layout = None
        if self._shm is not None:
            layout = _RegionLayout.of(spec, inputs)
            region = await self._shm.acquire(layout.nbytes)
        try:
            answer = await self._infer(spec, version, inputs, timeout_s, region, layout)
        except InferenceServerException as exc:
            if region is not None and TRITON_SHM_UNKNOWN in (exc.message() or "").lower():
                # Triton restarted (or the region was swept): drop them, answer over gRPC.
                region.close()
                await self._shm.clear()
                try:
                    return await self._infer(spec, version, inputs, timeout_s, None, None)
                except InferenceServerException as again:
                    raise map_triton_error(again, spec.name) from None
            if region is not None:
                self._shm.retire(region)
            raise map_triton_error(exc, spec.name) from None
        except BaseException:  # cancelled: Triton may still write into the region
            if region is not None:
                self._shm.retire(region)
            raise
        if region is not None:
            await self._shm.release(region)
        return answer

    async def _infer(self, spec: ModelSpec, version: str, inputs: dict[str, np.ndarray], timeout_s: float | None,
                     region: _Region | None, layout: "_RegionLayout | None") -> tuple[dict[str, np.ndarray], str]:
        """One Triton call; with `region`, inputs and the fixed-size outputs go through it,
        where `layout` places them."""
        infer_inputs = []
        for name, array in inputs.items():
            tensor = InferInput(name, list(array.shape), triton_datatype_name(array.dtype))
            if region is None:
                tensor.set_data_from_numpy(array)
            else:
                region.write(array, layout.inputs[name])
                tensor.set_shared_memory(region.name, array.nbytes, layout.inputs[name])
            infer_inputs.append(tensor)
        outputs, placed = self._requested_outputs(spec), {}
        if region is not None:
            outputs = []
            for tensor in spec.outputs:
                requested = InferRequestedOutput(tensor.name)
                if tensor.name in layout.outputs:
                    offset, nbytes = layout.outputs[tensor.name]
                    requested.set_shared_memory(region.name, nbytes, offset)
                    placed[tensor.name] = offset
                outputs.append(requested)
        result = await self._client.infer(
            spec.name,
            infer_inputs,
            model_version=version,
            outputs=outputs,
            client_timeout=timeout_s,
            timeout=int(timeout_s * 1e6) if timeout_s is not None else None,
        )
        arrays = {}
        for tensor in spec.outputs:
            if tensor.name in placed:
                arrays[tensor.name] = region.read(tensor.dtype, list(result.get_output(tensor.name).shape),
                                                  placed[tensor.name])
            else:
                arrays[tensor.name] = result.as_numpy(tensor.name)
        return {name: _widen(a) for name, a in arrays.items()}, result.get_response().model_version


def _output_bytes(spec: ModelSpec, tensor, items: int) -> int | None:
    """Bytes of output `tensor` for a call of `items` items; None where a dim is only
    known from the answer (variable-size models: that output comes over gRPC)."""
    dims = spec.config_dims(tensor)
    if any(d < 0 for d in dims):
        return None
    per_call = int(np.prod(dims)) * tensor.dtype.itemsize
    # With Triton batching, config dims are per item; a fixed batch is in the dims.
    return per_call * items if spec.max_batch_size > 0 else per_call


@dataclass(frozen=True)
class _RegionLayout:
    """Where a call's tensors sit in its region: each input's offset, each fixed-size
    output's (offset, bytes), aligned one after the other; `nbytes` in all."""

    inputs: dict[str, int]
    outputs: dict[str, tuple[int, int]]
    nbytes: int

    @classmethod
    def of(cls, spec: ModelSpec, inputs: dict[str, np.ndarray]) -> "_RegionLayout":
        offset, placed_inputs, placed_outputs = 0, {}, {}
        for name, array in inputs.items():
            placed_inputs[name] = offset
            offset += _aligned(array.nbytes)
        items = len(next(iter(inputs.values())))
        for tensor in spec.outputs:
            nbytes = _output_bytes(spec, tensor, items)
            if nbytes is not None:
                placed_outputs[tensor.name] = (offset, nbytes)
                offset += _aligned(nbytes)
        return cls(placed_inputs, placed_outputs, offset)


def _widen(array: np.ndarray) -> np.ndarray:
    """Half-precision outputs (float16 model files) as float32, so every decoder
    computes boxes and scores at one precision; other arrays as they are."""
    return array.astype(np.float32) if array.dtype == np.float16 else array


def _version_key(version: str):
    return (0, int(version)) if version.isdigit() else (1, version)
