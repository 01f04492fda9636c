"""The one interceptor of the Vision service: admission, auth, errors, metrics, logs.

Every call is admitted here (refused while draining, then authenticated, then bounded
by the calls in flight), its domain errors become status codes here and nowhere else,
and it is counted, timed and written as one JSON access-log line. Servicer methods
hold no try/except of their own.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

import grpc

from ..errors import ConvserveError, Internal, NotFound, ResourceExhausted, Unavailable, Unimplemented
from . import metrics
from .auth import TokenStore
from .convert import SERVICE_NAME, error_status
from .triton import TritonModels

log = logging.getLogger("convserve.gateway")
access_log = logging.getLogger("convserve.access")

REQUEST_ID_KEY = "x-request-id"
# Longest client-chosen request id kept: it goes into every log line of the call.
MAX_REQUEST_ID_CHARS = 128
# What the client sees of an unexpected exception: no traceback, no path.
_INTERNAL = Internal("internal error")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes; metrics and one access-log line per call.

    An unexpected exception becomes INTERNAL with a fixed message: no traceback or path
    reaches the client (it is logged here instead)."""

    def __init__(self, triton: TritonModels, max_in_flight: int, tokens: TokenStore | None = None):
        self._triton = triton
        self._max_in_flight = max_in_flight
        self._tokens = tokens
        self.in_flight = 0
        # Set by Gateway.stop: new calls are refused while the ones in flight finish.
        self.draining = False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _model_label(self, model: str) -> str:
        return model if model and self._triton.is_known(model) else metrics.UNKNOWN_MODEL

    def _wrap_unary(self, method, behavior):
        async def wrapper(request, context):
            request_id = _request_id(context)
            model = getattr(request, "model", "") or getattr(request, "name", "")
            images = len(getattr(request, "images", ()))
            metrics.REQUEST_BYTES.labels(method).observe(request.ByteSize())
            async with _Call(self, method, model, images, request_id, context) as call:
                # The handler's coroutine is made only once the call is admitted.
                return await call.run(lambda: behavior(request, context))
        return wrapper

    def _wrap_stream(self, method, behavior):
        async def wrapper(request_iterator, context):
            request_id = _request_id(context)
            async with _Call(self, method, "", 0, request_id, context) as call:
                async for response in call.iterate(behavior(call.watch(request_iterator), context)):
                    yield response
        return wrapper


class _Call:
    """One intercepted call: timing, in-flight gauge, error mapping and the log line."""

    def __init__(self, interceptor: ErrorInterceptor, method, model, images, request_id, context):
        self.interceptor, self.method, self.model = interceptor, method, model
        self.images, self.request_id, self.context = images, request_id, context
        self.code = "OK"
        self.message = ""

    async def __aenter__(self):
        self.start = time.perf_counter()
        metrics.IN_FLIGHT.labels(self.method).inc()
        self.interceptor.in_flight += 1
        return self

    def _admit(self) -> None:
        """Refused while draining; then authentication, then the in-flight bound."""
        if self.interceptor.draining:
            raise Unavailable("the gateway is shutting down; retry on another replica")
        tokens = self.interceptor._tokens
        if tokens is not None:
            tokens.check(self.context.invocation_metadata(), self.model)
        limit = self.interceptor._max_in_flight
        if self.interceptor.in_flight > limit:
            raise ResourceExhausted(f"the gateway is at its limit of {limit} calls in flight; retry later")

    @asynccontextmanager
    async def _mapped_errors(self):
        """Admit the call, then map whatever its body raises to a status code."""
        try:
            self._admit()
            yield
        except ConvserveError as exc:
            await self._abort(exc)
        except NotImplementedError:
            await self._abort(Unimplemented(f"{self.method} is not implemented yet"))
        except asyncio.CancelledError:
            self.code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error", extra={"request_id": self.request_id, "method": self.method})
            await self._abort(_INTERNAL)

    async def run(self, make_awaitable):
        async with self._mapped_errors():
            return await make_awaitable()

    async def iterate(self, agen):
        async with self._mapped_errors():
            async for item in agen:
                yield item

    async def watch(self, requests):
        """A stream's requests, each checked and counted as it arrives: the call was
        admitted before any message named a model, so a model-scoped token is checked
        against every message's model here; the first model names the call in metrics
        and the log line, and images are summed over the stream."""
        tokens = self.interceptor._tokens
        async for request in requests:
            model = getattr(request, "model", "")
            if tokens is not None and model:
                tokens.check(self.context.invocation_metadata(), model)
            self.model = self.model or model
            self.images += len(getattr(request, "images", ()))
            metrics.REQUEST_BYTES.labels(self.method).observe(request.ByteSize())
            yield request

    async def _abort(self, exc: ConvserveError):
        self.code, self.message = exc.code, exc.message
        if isinstance(exc, NotFound):
            self.model = ""  # never a metrics label for a name Triton does not know
        status = error_status(exc)
        await self.context.abort(status.code, status.details, status.trailing_metadata)

    async def __aexit__(self, exc_type, exc, tb):
        elapsed = time.perf_counter() - self.start
        model = self.interceptor._model_label(self.model)
        metrics.IN_FLIGHT.labels(self.method).dec()
        self.interceptor.in_flight -= 1
        metrics.REQUESTS.labels(self.method, model, self.code).inc()
        metrics.LATENCY.labels(self.method, model).observe(elapsed)
        if self.images:
            metrics.IMAGES.labels(self.method, model).inc(self.images)
        access_log.info("request", extra={
            "request_id": self.request_id, "method": self.method, "model": self.model,
            "images": self.images, "code": self.code, "duration_ms": round(elapsed * 1000, 3),
            **({"error": self.message} if self.message else {}),
        })
        return False


def _request_id(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:MAX_REQUEST_ID_CHARS]
    return uuid.uuid4().hex
