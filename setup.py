"""Generates the gRPC stubs from `service/proto/*.proto` whenever the package is built or
installed (editable installs included), so generated code never lives in git."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def generate_grpc_stubs() -> None:
    from grpc_tools import protoc

    for proto in sorted((ROOT / "service" / "proto").glob("*.proto")):
        relative = proto.relative_to(ROOT).as_posix()
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            relative,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {relative}")


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_grpc_stubs()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
