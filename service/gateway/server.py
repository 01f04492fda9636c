"""The gRPC transport: servicer, error interceptor, health, reflection.

Servicer methods only translate proto -> plain data -> data plane -> proto. A single
interceptor maps domain errors to status codes, counts and times every call, and writes
one JSON log line per request. This is the only module that touches protobuf or the
gRPC context.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from . import metrics
from .._proto import vision_pb2, vision_pb2_grpc
from .dataplane import DataPlane
from ..errors import ConvserveError, InvalidArgument, NotFound, ResourceExhausted, Unavailable, Unimplemented
from ..pipelines import classification, detection, generation, segmentation
from ..pipelines.common import ImageInput
from ..settings import Settings
from .auth import TokenStore
from .triton import TritonModels

log = logging.getLogger("convserve.gateway")
access_log = logging.getLogger("convserve.access")

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["Vision"].full_name
READINESS = ""          # grpc.health.v1 service name for readiness (follows Triton)
LIVENESS = "liveness"   # SERVING while the gateway's event loop answers
REQUEST_ID_KEY = "x-request-id"
# DetectStream: frames in flight per stream, the one being answered included (bounds a
# stream's memory and its share of the gateway).
STREAM_WINDOW = 4
# How often a draining gateway checks whether its calls in flight have finished.
DRAIN_POLL_S = 0.05


# --------------------------------------------------------------------------- errors
def _status_for(exc: ConvserveError) -> grpc.Status:
    code = getattr(code_pb2, exc.code)
    status = status_pb2.Status(code=code, message=exc.message)
    if isinstance(exc, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)]))
        status.details.append(detail)
    return rpc_status.to_status(status)


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
        status = _status_for(exc)
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


class _InternalError(ConvserveError):
    code = "INTERNAL"


_INTERNAL = _InternalError("internal error")


def _request_id(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:128]
    return uuid.uuid4().hex


# ------------------------------------------------------------------- proto <-> data
def images_from_proto(images) -> list[ImageInput]:
    out = []
    for image in images:
        which = image.WhichOneof("source")
        if which == "encoded":
            out.append(ImageInput(encoded=image.encoded))
        elif which == "raw":
            out.append(ImageInput(raw=image.raw.data, height=image.raw.height, width=image.raw.width))
        else:
            out.append(ImageInput())
    return out


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


def _label(result) -> vision_pb2.Label:
    return vision_pb2.Label(index=result.index, name=result.name, score=result.score)


def _discard(task: asyncio.Future | None) -> None:
    """Cancel a frame nobody will answer; a finished one's error is marked as seen."""
    if task is None:
        return
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()


def _detect_options(request) -> dict:
    return {"score_threshold": _optional(request, "score_threshold"),
            "iou_threshold": _optional(request, "iou_threshold"),
            "max_detections": _optional(request, "max_detections"),
            "class_ids": list(request.class_ids)}


def detections_to_proto(result) -> list[vision_pb2.Detection]:
    """`pipelines.detection.Detections` (or anything with boxes/scores/labels/names)
    as Detection messages, best first."""
    return [vision_pb2.Detection(
                box=vision_pb2.Box(x_min=x1, y_min=y1, x_max=x2, y_max=y2),
                label=vision_pb2.Label(index=label, name=name, score=score))
            for (x1, y1, x2, y2), score, label, name in zip(
                result.boxes.tolist(), result.scores.tolist(), result.labels.tolist(), result.names)]


def _detect_response(answer) -> vision_pb2.DetectResponse:
    return vision_pb2.DetectResponse(
        model=answer.model, model_version=answer.version,
        results=[vision_pb2.Detections(detections=detections_to_proto(r), image_width=r.width,
                                       image_height=r.height) for r in answer.results])


# MaskFormat enum -> the pipeline's name (UNSPECIFIED: the default, RLE). An unknown
# number is passed on as it is, and the pipeline refuses it naming `mask_format`.
_MASK_FORMATS = {vision_pb2.MASK_FORMAT_UNSPECIFIED: None, vision_pb2.MASK_FORMAT_RLE: "rle",
                 vision_pb2.MASK_FORMAT_PNG: "png"}


def _segmentation(result) -> vision_pb2.Segmentation:
    out = vision_pb2.Segmentation(
        label_map_png=result.label_map_png, image_width=result.width, image_height=result.height,
        classes=[vision_pb2.ClassPixels(label=_label(c.label), pixels=c.pixels) for c in result.classes])
    for instance in result.instances:
        x1, y1, x2, y2 = instance.box
        mask = (vision_pb2.Mask(png=instance.png) if instance.png is not None else
                vision_pb2.Mask(rle=vision_pb2.Rle(height=result.height, width=result.width, counts=instance.rle)))
        out.instances.append(vision_pb2.Detection(
            box=vision_pb2.Box(x_min=x1, y_min=y1, x_max=x2, y_max=y2), label=_label(instance.label), mask=mask))
    return out


def model_info(status, spec) -> vision_pb2.ModelInfo:
    info = vision_pb2.ModelInfo(name=status.name, versions=list(status.versions), ready=status.ready)
    if spec is not None:
        info.task = spec.task
        info.architecture = spec.architecture
        info.labels.extend(spec.labels)
        info.input_width = max(spec.input_width, 0)
        info.input_height = max(spec.input_height, 0)
        info.resize_mode = spec.resize_mode
        info.max_batch_size = spec.max_batch_size
    return info


# ------------------------------------------------------------------------- servicer
class VisionServicer(vision_pb2_grpc.VisionServicer):
    """Translates between messages and the data plane; no logic of its own."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def Classify(self, request, context):
        answer = await self.plane.run(
            classification.TASK, request.model, request.model_version, images_from_proto(request.images),
            {"top_k": _optional(request, "top_k")}, context.time_remaining())
        return vision_pb2.ClassifyResponse(
            model=answer.model, model_version=answer.version,
            results=[vision_pb2.Classification(labels=[_label(l) for l in labels])
                     for labels in answer.results])

    async def Detect(self, request, context):
        answer = await self.plane.run(
            detection.TASK, request.model, request.model_version, images_from_proto(request.images),
            _detect_options(request), context.time_remaining())
        return _detect_response(answer)

    async def DetectStream(self, request_iterator, context):
        """Each request is one frame (or several images), answered in request order.

        Frames are pipelined: a reader task starts each frame as it arrives, so later
        frames decode and infer while earlier ones are answered; at most `STREAM_WINDOW`
        frames are in flight (a full window stops reading, so memory stays bounded).
        Answers still leave in request order. An error ends the stream at its frame,
        after the answers of the frames before it; INVALID_ARGUMENT names the frame:
        ``frames[7].images[0].encoded`` is image 0 of the stream's eighth request
        (counting from 0)."""
        started: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_WINDOW)

        async def read() -> None:
            frame = 0
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    started.put_nowait(asyncio.ensure_future(self._detect_frame(request, frame, context)))
                    frame += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. a token not allowed for this frame's model
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                started.put_nowait(failed)
                return
            started.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await started.get()) is not None:
                try:
                    yield await task
                finally:
                    slots.release()
        finally:
            reader.cancel()
            while not started.empty():
                _discard(started.get_nowait())

    async def _detect_frame(self, request, frame: int, context) -> vision_pb2.DetectResponse:
        try:
            answer = await self.plane.run(
                detection.TASK, request.model, request.model_version, images_from_proto(request.images),
                _detect_options(request), context.time_remaining())
        except InvalidArgument as exc:
            raise InvalidArgument(f"frames[{frame}].{exc.field}", exc.description) from None
        return _detect_response(answer)

    async def ListModels(self, request, context):
        models = await self.plane.list_models()
        return vision_pb2.ListModelsResponse(models=[model_info(s, spec) for s, spec in models])

    async def GetModel(self, request, context):
        if not request.name:
            raise InvalidArgument("name", "a model name is required")
        for status, spec in await self.plane.list_models():
            if status.name == request.name:
                return model_info(status, spec)
        raise NotFound(f"unknown model {request.name!r}")

    async def Segment(self, request, context):
        options = {
            "mask_format": _MASK_FORMATS.get(request.mask_format, request.mask_format),
            "score_threshold": _optional(request, "score_threshold"),
            "iou_threshold": _optional(request, "iou_threshold"),
            "max_detections": _optional(request, "max_detections"),
        }
        answer = await self.plane.run(
            segmentation.TASK, request.model, request.model_version, images_from_proto(request.images),
            options, context.time_remaining())
        return vision_pb2.SegmentResponse(
            model=answer.model, model_version=answer.version,
            results=[_segmentation(result) for result in answer.results])

    # ----------------------------------------------------------------------------

    async def Generate(self, request, context):
        answer = await self.plane.run(
            generation.TASK, request.model, request.model_version, images_from_proto(request.images),
            {"output_format": request.output_format, "jpeg_quality": _optional(request, "jpeg_quality")},
            context.time_remaining())
        generation.check_answer_size(answer.results, self.plane.settings.max_receive_message_bytes)
        return vision_pb2.GenerateResponse(
            model=answer.model, model_version=answer.version,
            results=[vision_pb2.GeneratedImage(image=r.image, mime_type=r.mime_type, width=r.width, height=r.height)
                     for r in answer.results])


# --------------------------------------------------------------------------- server
def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS, or mTLS when a client CA is configured (clients must then present a cert)."""
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class Gateway:
    """The running gateway: gRPC server, health, and the Triton readiness watch."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.triton = TritonModels(settings.triton_url)
        self.plane = DataPlane(settings, self.triton)
        self.health = HealthServicer()
        self.interceptor = ErrorInterceptor(
            self.triton, settings.max_in_flight,
            TokenStore(settings.auth_tokens_file) if settings.auth_tokens_file else None)
        self.server = grpc.aio.server(interceptors=[self.interceptor], options=self._server_options(settings))
        vision_pb2_grpc.add_VisionServicer_to_server(VisionServicer(self.plane), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME), self.server)
        address = f"{settings.grpc_host}:{settings.grpc_port}"
        if settings.tls_cert_file is not None:
            self.port = self.server.add_secure_port(address, _server_credentials(settings))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind the gRPC port {settings.grpc_host}:{settings.grpc_port}")
        self._watch: asyncio.Task | None = None
        self._draining = False

    @staticmethod
    def _server_options(settings: Settings) -> list[tuple[str, int]]:
        options = [
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", settings.max_receive_message_bytes),
            # A second gateway on the same port must fail to bind, not share it.
            ("grpc.so_reuseport", 0),
        ]
        if settings.max_connection_age_s > 0:
            age_ms = int(settings.max_connection_age_s * 1000)
            options += [("grpc.max_connection_age_ms", age_ms),
                        # Calls still running when the age is reached get this long.
                        ("grpc.max_connection_age_grace_ms", int(settings.drain_grace_s * 1000))]
        return options

    async def start(self) -> None:
        await self._set_health(LIVENESS, True)
        await self._poll_triton()
        self._watch = asyncio.create_task(self._watch_triton(), name="triton-watch")
        await self.server.start()
        log.info("gateway serving", extra={"port": self.port, "triton": self.settings.triton_url})

    async def _set_health(self, service: str, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(service, status)

    async def _poll_triton(self) -> None:
        ready = await self.triton.server_ready()
        if ready and not self.plane.triton_ready:
            self.triton.forget_specs()  # a (re)started Triton may serve other models
            log.info("triton ready", extra={"triton": self.settings.triton_url})
        elif not ready and self.plane.triton_ready:
            log.warning("triton not ready", extra={"triton": self.settings.triton_url})
        self.plane.triton_ready = ready
        metrics.TRITON_READY.set(1 if ready else 0)
        serving = ready and not self._draining
        await self._set_health(READINESS, serving)
        await self._set_health(SERVICE_NAME, serving)

    async def _watch_triton(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_poll_s)
            try:
                await self._poll_triton()
            except Exception:  # the watch must never die
                log.exception("triton readiness poll failed")

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then stop: turn NOT_SERVING, refuse new calls with UNAVAILABLE, let
        the calls in flight finish (for at most `grace` seconds), then close the server.

        The server keeps listening while it drains, so health checks see NOT_SERVING
        (not a closed port) and clients get a clear UNAVAILABLE to retry elsewhere.
        Calls still running when the grace time is over are cancelled."""
        self._draining = True
        self.interceptor.draining = True
        grace = self.settings.drain_grace_s if grace is None else grace
        await self._set_health(READINESS, False)
        await self._set_health(SERVICE_NAME, False)
        in_flight = self.interceptor.in_flight
        log.info("gateway draining", extra={"grace_s": grace, "in_flight": in_flight})
        deadline = time.monotonic() + grace
        while self.interceptor.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        log.info("gateway drained", extra={"in_flight": self.interceptor.in_flight,
                                           "drain_s": round(grace - max(deadline - time.monotonic(), 0), 3)})
        await self.server.stop(max(deadline - time.monotonic(), 0))
        if self._watch:
            self._watch.cancel()
        self.plane.close()
        await self.triton.close()
        log.info("gateway stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()
