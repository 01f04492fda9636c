"""One validated settings object, read from CONVSERVE_* variables.

CLI flags override these (see cli.py). Validation happens at start-up, so a bad value
stops the process with a message naming the variable instead of failing mid-request.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVSERVE_", extra="ignore")

    # --- gateway
    grpc_host: str = "[::]"
    grpc_port: int = Field(50051, ge=1, le=65535)
    metrics_port: int = Field(9464, ge=0, le=65535, description="0 disables /metrics")
    triton_url: str = "localhost:8001"
    reflection: bool = True
    max_receive_message_bytes: int = Field(64 * MIB, ge=MIB, le=1024 * MIB)
    max_images_per_request: int = Field(64, ge=1, le=4096)
    # Calls handled at once; past it, RESOURCE_EXHAUSTED at once instead of queueing.
    max_in_flight: int = Field(128, ge=1, le=100_000)
    # Close client connections after this long (0: never), so that long-lived HTTP/2
    # connections re-balance over gateway pods when they scale.
    max_connection_age_s: float = Field(300.0, ge=0)
    # An image whose header claims more pixels than this is refused before decoding.
    # At most Pillow's own hard limit (2 x PIL.Image.MAX_IMAGE_PIXELS): it refuses more.
    max_image_pixels: int = Field(40_000_000, ge=1, le=178_956_970)
    # Encoded bytes per image, checked before decoding (the whole request is bounded
    # by max_receive_message_bytes, which gRPC itself enforces).
    max_image_bytes: int = Field(32 * MIB, ge=1024, le=1024 * MIB)
    # Seconds given to calls in flight after SIGTERM, before they are cancelled.
    drain_grace_s: float = Field(20.0, ge=0, le=600)
    # How often the gateway asks Triton whether it is ready (readiness health).
    health_poll_s: float = Field(0.5, gt=0, le=30)
    # Tensors to and from Triton through system shared memory (/dev/shm) instead of
    # gRPC messages: only where the gateway and Triton share a host (`convserve serve`
    # turns it on; the Helm chart's one-pod mode sets it). For a 640x640 detector this
    # saves the gateway framing 4 MB per image (docs/performance.md).
    triton_shared_memory: bool = False
    # Threads that decode and resize images, off the event loop.
    preprocess_threads: int = Field(2, ge=1, le=256)
    log_level: str = "INFO"
    # TLS on the gateway port: certificate and key files (PEM). With a client CA, mTLS:
    # clients must present a certificate signed by it.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Bearer-token / API-key auth: a file with one token per line (see service/gateway/auth.py).
    auth_tokens_file: Path | None = None

    # --- embedded Triton (`convserve triton` / `convserve serve`)
    model_repository: Path = Path("model_repository")
    triton_http_port: int = Field(8000, ge=1, le=65535)
    triton_grpc_port: int = Field(8001, ge=1, le=65535)
    triton_metrics_port: int = Field(8002, ge=1, le=65535)
    triton_log: Path = Path(".convserve/triton.log")
    triton_startup_timeout_s: float = Field(300.0, gt=0)
    # The embedded Triton listens on loopback only: the gateway is its one client.
    triton_bind_address: str = "127.0.0.1"
    # `convserve serve` restarts a Triton that died: first after this many seconds, then
    # twice as long after each death that came sooner than triton_restart_reset_s after
    # the last start, never longer than the maximum.
    triton_restart_backoff_s: float = Field(1.0, gt=0, le=600)
    triton_restart_backoff_max_s: float = Field(30.0, gt=0, le=3600)
    triton_restart_reset_s: float = Field(60.0, gt=0)
    default_models: str = "resnet18,yolo,unet,maskrcnn_resnet50_fpn,cyclegan,rcnn,fast_rcnn"
    # Intra-op threads of a run in the embedded backends (torch and ONNX Runtime). 0 (the
    # default): adaptive (`embedded.thread_counts`): a run that has the machine to itself
    # gets every core this process may use (one caller: the lowest latency), and runs
    # that overlap get those cores shared out over every model instance in the
    # repository, at least 1 each (`embedded.backend_threads`). Why shared under load:
    # each thread pool spins on as many cores as it has threads, and more threads than
    # cores in total make loaded models wait on each other: measured at 1.0-1.9 s instead
    # of 0.15 s per resnet18 request on an oversubscribed machine (docs/performance.md).
    # A number > 0 fixes every run at that many threads.
    torch_threads: int = Field(0, ge=0, le=1024)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log level must be DEBUG, INFO, WARNING or ERROR, got {value!r}")
        return level

    @model_validator(mode="after")
    def _tls_pairs(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        return self

    @property
    def default_model_list(self) -> list[str]:
        return [name.strip() for name in self.default_models.split(",") if name.strip()]


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with the CLI's non-None overrides on top."""
    return Settings(**{key: value for key, value in overrides.items() if value is not None})
