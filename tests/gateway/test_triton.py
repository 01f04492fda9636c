"""Triton's errors mapped to domain errors by the gRPC status code tritonclient carries
(InferenceServerException.status() is str(grpc.StatusCode.X)); the message is read
only where Triton itself tells UNAVAILABLE conditions apart by message."""
from __future__ import annotations

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from service.gateway.triton import map_triton_error


def _error(code: grpc.StatusCode | None, message: str = "details") -> InferenceServerException:
    # As tritonclient.grpc._utils.get_error_grpc builds it from a grpc.RpcError.
    return InferenceServerException(message, status=None if code is None else str(code))


def test_triton_queue_full_maps_to_resource_exhausted():
    error = map_triton_error(InferenceServerException(
        "Exceeds maximum queue size", status="StatusCode.UNAVAILABLE"), "m")
    assert error.code == "RESOURCE_EXHAUSTED"
    assert map_triton_error(InferenceServerException("Request for unknown model: 'x' is not found",
                                                     status="StatusCode.NOT_FOUND"), "x").code == "NOT_FOUND"


@pytest.mark.parametrize("code, expected", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    (grpc.StatusCode.CANCELLED, "CANCELLED"),
    (grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
    (grpc.StatusCode.INVALID_ARGUMENT, "INTERNAL"),
    (grpc.StatusCode.INTERNAL, "INTERNAL"),
    (grpc.StatusCode.UNKNOWN, "INTERNAL"),
    (grpc.StatusCode.FAILED_PRECONDITION, "INTERNAL"),
    (None, "INTERNAL"),  # raised by tritonclient itself, before any call
])
def test_each_status_code(code, expected):
    assert map_triton_error(_error(code), "m").code == expected


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, None])
def test_message_words_do_not_decide_the_code(code):
    # A model's own error text (the python backend sends "TypeName: text" as INTERNAL)
    # may say anything; only the status code counts.
    for text in ("timeout in my model", "deadline", "unknown model 'x' is not found",
                 "Exceeds maximum queue size", "not ready"):
        assert map_triton_error(_error(code, text), "m").code == "INTERNAL"


@pytest.mark.parametrize("message, expected, says", [
    # Triton core src/scheduler_utils.cc (the request is logged before the text).
    ("[request id: 7] Exceeds maximum queue size", "RESOURCE_EXHAUSTED", "queue is full"),
    # Triton core src/dynamic_batch_scheduler.cc.
    ("Request timeout expired", "DEADLINE_EXCEEDED", "deadline exceeded"),
    # Triton core src/model_lifecycle.cc.
    ("Request for unknown model: 'm' version 2 is not at ready state", "UNAVAILABLE", "model 'm' is not ready"),
    # Triton down, as gRPC says it.
    ("failed to connect to all addresses", "UNAVAILABLE", "the inference server is unavailable"),
])
def test_unavailable_is_told_apart_by_tritons_own_messages(message, expected, says):
    error = map_triton_error(_error(grpc.StatusCode.UNAVAILABLE, message), "m")
    assert error.code == expected and says in error.message


def test_messages_name_the_model_and_nothing_of_triton():
    error = map_triton_error(_error(grpc.StatusCode.INTERNAL, "at /srv/models/m/1/model.py line 3"), "m")
    assert error.message == "inference failed for model 'm'"
