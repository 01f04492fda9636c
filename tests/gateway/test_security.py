"""TLS, mTLS and token auth on the real gateway (in this process, on real ports)."""
from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import free_port
from service._proto import vision_pb2, vision_pb2_grpc
from service.gateway.server import Gateway
from service.settings import load_settings


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=convserve-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


async def _with_gateway(settings, body):
    gateway = Gateway(settings)
    await gateway.start()
    try:
        return await body(f"localhost:{gateway.port}")
    finally:
        await gateway.stop(0)


def _classify(channel, metadata=()):
    return vision_pb2_grpc.VisionStub(channel).Classify(
        vision_pb2.ClassifyRequest(model="resnet18", images=[vision_pb2.Image(encoded=b"x")]),
        timeout=5, metadata=metadata)


async def _code(channel, metadata=()):
    try:
        await _classify(channel, metadata)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details()


def test_tokens_unauthenticated_permission_denied_and_health_exempt(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# one token per line\nsecret-all\nsecret-scoped other_model\n")
    settings = load_settings(grpc_port=free_port(), metrics_port=0, triton_url="127.0.0.1:9",
                             auth_tokens_file=tokens)

    async def body(address):
        async with grpc.aio.insecure_channel(address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
            return (health.status,
                    await _code(channel),
                    await _code(channel, [("authorization", "Bearer wrong")]),
                    await _code(channel, [("x-api-key", "secret-scoped")]),
                    await _code(channel, [("authorization", "Bearer secret-all")]))
    health, none, wrong, scoped, good = asyncio.run(_with_gateway(settings, body))
    assert health == health_pb2.HealthCheckResponse.SERVING  # health needs no token
    assert none[0] == "UNAUTHENTICATED" and wrong[0] == "UNAUTHENTICATED"
    assert scoped[0] == "PERMISSION_DENIED"
    assert good == ("UNAVAILABLE", "the inference server is not ready")  # authenticated; no Triton here
    assert "secret" not in repr((none, wrong, scoped, good))


def test_tls_and_mtls(pki):
    server = dict(tls_cert_file=pki / "server.crt", tls_key_file=pki / "server.key")
    ca = (pki / "ca.crt").read_bytes()

    async def body(address, client_cert):
        creds = grpc.ssl_channel_credentials(root_certificates=ca, **client_cert)
        async with grpc.aio.secure_channel(address, creds) as channel:
            return await _code(channel)

    client = dict(private_key=(pki / "client.key").read_bytes(), certificate_chain=(pki / "client.crt").read_bytes())
    tls = load_settings(grpc_port=free_port(), metrics_port=0, triton_url="127.0.0.1:9", **server)
    # The gateway itself answered (no Triton runs here), so the TLS handshake worked.
    reached = ("UNAVAILABLE", "the inference server is not ready")
    assert asyncio.run(_with_gateway(tls, lambda a: body(a, {}))) == reached
    mtls = load_settings(grpc_port=free_port(), metrics_port=0, triton_url="127.0.0.1:9",
                         tls_client_ca_file=pki / "ca.crt", **server)
    assert asyncio.run(_with_gateway(mtls, lambda a: body(a, client))) == reached
    # Without a client certificate the mTLS handshake fails before any handler runs.
    refused = asyncio.run(_with_gateway(mtls, lambda a: body(a, {})))
    assert refused != reached and refused[0] == "UNAVAILABLE"


def test_tls_settings_must_pair(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ValueError, match="set together"):
        load_settings(tls_cert_file=cert)
    with pytest.raises(ValueError, match="not a readable file"):
        load_settings(auth_tokens_file=tmp_path / "missing")
