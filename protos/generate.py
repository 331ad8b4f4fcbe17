"""Regenerate the committed Python and type stubs from the .proto files.

Run `python -m protos.generate` after editing a .proto; `tests/test_proto_stubs.py`
fails when the committed stubs differ from what this produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ("protos/emsfl/v1/federation.proto",)


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs of every proto under `out_dir` (mirroring the repo layout)."""
    from grpc_tools import protoc  # dev-only dependency

    include = Path(protoc.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent  # mypy-protobuf's plugins sit next to the interpreter
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            str(ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return [out_dir / name for name in stub_names()]


def stub_names() -> list[str]:
    """Repo-relative paths of every generated stub."""
    suffixes = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
    return [proto.removesuffix(".proto") + suffix for proto in PROTO_FILES for suffix in suffixes]


if __name__ == "__main__":
    written = generate(ROOT)
    sys.stdout.write("".join(f"{p.relative_to(ROOT)}\n" for p in written))
