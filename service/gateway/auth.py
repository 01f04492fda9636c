"""Optional bearer-token / API-key authentication for the Vision service.

Tokens live in a file (a mounted Kubernetes Secret), one per line: `TOKEN` allows every
model, `TOKEN model_a,model_b` only those models. A call presents its token as
`authorization: Bearer TOKEN` or `x-api-key: TOKEN`. Tokens are compared in constant
time and never logged. The file is re-read when it changes (Secret rotation).
"""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConvserveError


class Unauthenticated(ConvserveError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ConvserveError):
    code = "PERMISSION_DENIED"


@dataclass(frozen=True)
class _Token:
    secret: bytes
    models: frozenset[str] | None  # None: every model


class TokenStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._mtime: float | None = None
        self._tokens: tuple[_Token, ...] = ()
        self._reload()
        if not self._tokens:
            raise ValueError(f"auth tokens file {self.path} holds no token")

    def _reload(self) -> None:
        mtime = os.stat(self.path).st_mtime
        if mtime == self._mtime:
            return
        tokens = []
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            models = frozenset(m for m in ",".join(parts[1:]).split(",") if m) if len(parts) > 1 else None
            tokens.append(_Token(parts[0].encode(), models))
        self._tokens, self._mtime = tuple(tokens), mtime

    def check(self, metadata, model: str) -> None:
        """Raise Unauthenticated (no or unknown token) or PermissionDenied (token not
        allowed for `model`)."""
        presented = _presented_token(metadata)
        if presented is None:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>' or 'x-api-key'")
        try:
            self._reload()
        except OSError:
            pass  # keep the last good tokens while a Secret is being swapped
        match = None
        for token in self._tokens:  # every token is compared: no early exit on a match
            if hmac.compare_digest(token.secret, presented):
                match = token
        if match is None:
            raise Unauthenticated("invalid credentials")
        # Streams are admitted before their first message names a model.
        if match.models is not None and model and model not in match.models:
            raise PermissionDenied(f"this token may not use model {model!r}")


def _presented_token(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip().encode()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip().encode()
    return None
