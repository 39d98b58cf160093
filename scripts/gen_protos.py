"""Regenerate src/testhide/protos/v1/*_pb2*.py(i) in place; `--check` fails on any difference.

Besides protoc's Python modules it writes typed stubs with mypy-protobuf (`*_pb2.pyi` for the messages,
`*_pb2_grpc.pyi` for the stubs and servicers, grpc.aio included), so that `mypy --strict` sees the wire
types exactly.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools  # type: ignore[import-untyped]  # grpcio-tools ships no type information
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PROTO_DIR = SRC / "testhide" / "protos" / "v1"


def _plugin(name: str) -> str:
    """The mypy-protobuf plugins are installed next to the interpreter running this script."""
    path = Path(sys.executable).parent / name
    found = path if path.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install the test extras (mypy-protobuf)")
    return f"--plugin={name}={found}"


def generate(out: Path) -> None:
    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(SRC)) for p in PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{SRC}",
        f"-I{include}",
        _plugin("protoc-gen-mypy"),
        _plugin("protoc-gen-mypy_grpc"),
        f"--python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out=quiet:{out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        generated = sorted((Path(tmp) / "testhide" / "protos" / "v1").iterdir())
        stale = [
            p.name
            for p in generated
            if not (PROTO_DIR / p.name).exists() or not filecmp.cmp(p, PROTO_DIR / p.name, shallow=False)
        ]
        if check:
            if stale:
                print("generated protobuf code is out of date:", ", ".join(stale), file=sys.stderr)
                return 1
            return 0
        for p in generated:
            shutil.copy(p, PROTO_DIR / p.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
