"""Build hook: generate the protobuf and gRPC code from protos/ into service/_proto/.

The generated modules are never committed or edited by hand (see DESIGN.md).
"""
import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "service" / "_proto"


def generate_protos() -> None:
    from grpc_tools import protoc  # build requirement

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *map(str, protos)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
        for generated in Path(tmp).rglob("*.py*"):
            text = generated.read_text()
            # protoc writes absolute imports (`from convserve.v1 import vision_pb2`);
            # the modules live flat inside service._proto, so make them relative.
            text = re.sub(r"^from convserve\.v1 import ", "from . import ", text, flags=re.M)
            (OUT / generated.name).write_text(text)


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
