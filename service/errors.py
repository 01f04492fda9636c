"""Domain errors. The transport maps each one to a gRPC status code in one place
(gateway.interceptors); pipelines raise these and never touch gRPC.
"""
from __future__ import annotations


class ConvserveError(Exception):
    """Base class; `code` is the grpc.StatusCode name the transport answers with."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ConvserveError):
    """A bad image or parameter. `field` names it, e.g. ``images[2].encoded``."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class NotFound(ConvserveError):
    code = "NOT_FOUND"


class FailedPrecondition(ConvserveError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ConvserveError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ConvserveError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ConvserveError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ConvserveError):
    code = "CANCELLED"


class Unimplemented(ConvserveError):
    code = "UNIMPLEMENTED"


class Internal(ConvserveError):
    code = "INTERNAL"
