"""Settings: one validated object from CONVSERVE_* variables, flags on top."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.settings import load_settings


def test_environment_and_overrides(monkeypatch):
    monkeypatch.setenv("CONVSERVE_GRPC_PORT", "6000")
    monkeypatch.setenv("CONVSERVE_REFLECTION", "false")
    settings = load_settings()
    assert settings.grpc_port == 6000 and settings.reflection is False
    assert load_settings(grpc_port=7000).grpc_port == 7000
    assert load_settings(grpc_port=None).grpc_port == 6000  # an unset flag keeps the variable


@pytest.mark.parametrize("name,value", [("CONVSERVE_GRPC_PORT", "70000"), ("CONVSERVE_MAX_IN_FLIGHT", "0"),
                                        ("CONVSERVE_LOG_LEVEL", "LOUD")])
def test_invalid_values_fail_fast(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        load_settings()


def test_cli_names_the_bad_variable(tmp_path):
    env = dict(os.environ, CONVSERVE_GRPC_PORT="not-a-port")
    out = subprocess.run([sys.executable, "-m", "service.cli", "gateway"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "CONVSERVE_GRPC_PORT" in out.stderr and "not-a-port" in out.stderr
