"""Triton's errors mapped to domain errors by the gRPC status code tritonclient carries
(InferenceServerException.status() is str(grpc.StatusCode.X)); the message is read
only where Triton itself tells UNAVAILABLE conditions apart by message."""
from __future__ import annotations

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from service.gateway.triton import LISTED_MODELS, map_triton_error, unknown_model


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


def test_an_unknown_model_names_the_closest_and_the_ready_ones():
    error = unknown_model("resnet19", ["yolo", "resnet18", "unet"])
    assert error.code == "NOT_FOUND"
    assert str(error) == "unknown model 'resnet19'; did you mean 'resnet18'? (ready: resnet18, unet, yolo)"
    # Nothing close: only the list; none ready; not known (Triton's index unreadable).
    assert str(unknown_model("x", ["yolo"])) == "unknown model 'x' (ready: yolo)"
    assert str(unknown_model("x", [])) == "unknown model 'x' (no model is ready)"
    assert str(unknown_model("x", None)) == "unknown model 'x'"


def test_an_unknown_model_lists_a_bounded_number_of_names():
    served = [f"model_{i:03d}" for i in range(LISTED_MODELS + 5)]
    message = str(unknown_model("other", served))
    assert message.endswith(f"model_{LISTED_MODELS - 1:03d} and 5 more)")
    assert f"model_{LISTED_MODELS:03d}" not in message
