"""Regenerate protos/v1/*_pb2*.py(i) in place; `--check` fails on any difference."""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "v1"


def generate(out: Path) -> None:
    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT)) for p in PROTO_DIR.glob("*.proto"))
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        generated = sorted((Path(tmp) / "protos" / "v1").iterdir())
        stale = [p.name for p in generated if not (PROTO_DIR / p.name).exists()
                 or not filecmp.cmp(p, PROTO_DIR / p.name, shallow=False)]
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
