"""Generate the Python gRPC stubs (and mypy .pyi) for protos/ into client/v1.

    python protos/generate.py           # write client/v1/*_pb2*.py[i]
    python protos/generate.py --check   # exit 1 if the committed stubs differ from protos/

Needs grpcio-tools (pinned in the `dev` extra: the stubs refuse to import under a grpcio older
than the grpcio-tools that made them) and mypy-protobuf's protoc plugins on PATH.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "client" / "v1"


def generate(into: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc  # dev dependency

    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "lcmserve" / "v1").glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={into}", f"--grpc_python_out={into}",
            f"--mypy_out={into}", f"--mypy_grpc_out={into}", *sources]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    # protoc writes lcmserve/v1/*: the import name lcmserve.v1 maps to client/v1.
    return sorted((into / "lcmserve" / "v1").iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(pathlib.Path(tmp))
        if args.check:
            stale = [f.name for f in files if not (TARGET / f.name).exists() or not filecmp.cmp(f, TARGET / f.name, shallow=False)]
            if stale:
                sys.exit(f"client/v1 is out of date with protos/ ({', '.join(stale)}): run `make proto` and commit")
            print(f"client/v1 matches protos/ ({len(files)} files)")
            return
        TARGET.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, TARGET / f.name)
            print(f"wrote {(TARGET / f.name).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
