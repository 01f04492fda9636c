"""The gateway (every module of service.gateway, and the CLI) imports no torch and no
model code."""
from __future__ import annotations

import subprocess
import sys

from helpers import free_port

FORBIDDEN = ("torch", "torchvision", "onnxruntime", "service.export.zoo", "service.exporter", "service.export.tvshim")

PROGRAM = f"""
import asyncio, importlib, pkgutil, sys
from service import cli, gateway as gateway_package
from service.gateway.server import Gateway
from service.settings import load_settings

# Every module of the gateway package, present and future.
for module in pkgutil.iter_modules(gateway_package.__path__):
    importlib.import_module("service.gateway." + module.name)

async def main():
    gateway = Gateway(load_settings(grpc_port=int(sys.argv[1]), metrics_port=0, triton_url="127.0.0.1:9"))
    await gateway.server.start()
    await gateway.stop(0)

asyncio.run(main())
print(sorted(m for m in sys.modules if m.split('.')[0] in {{'torch', 'torchvision', 'onnxruntime'}}
             or m in {FORBIDDEN!r}))
"""


def test_gateway_process_has_no_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(free_port())], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
