"""The gateway's life cycle: the gRPC server, TLS, health, drain and Triton polling.

`Gateway` puts the pieces together (Triton client, data plane, interceptor, servicer,
health and reflection), watches Triton's readiness, and on `stop` drains: NOT_SERVING
first, then new calls refused while the ones in flight finish.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .._proto import vision_pb2_grpc
from ..settings import Settings
from . import metrics
from .auth import TokenStore
from .convert import SERVICE_NAME
from .dataplane import DataPlane
from .interceptors import ErrorInterceptor
from .servicer import VisionServicer
from .triton import TritonModels

log = logging.getLogger("convserve.gateway")

READINESS = ""          # grpc.health.v1 service name for readiness (follows Triton)
LIVENESS = "liveness"   # SERVING while the gateway's event loop answers
# How often a draining gateway checks whether its calls in flight have finished.
DRAIN_POLL_S = 0.05


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
        self.triton = TritonModels(settings.triton_url, shared_memory=settings.triton_shared_memory)
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
            await self.triton.forget_specs()  # a (re)started Triton may serve other models
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
