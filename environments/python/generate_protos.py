"""Regenerates chorus_env/_proto/ from ../../proto/chorus/v1/*.proto.

The generated modules are committed so that `pip install` needs only grpcio and protobuf
from PyPI. Run this after changing a .proto file (it needs grpcio-tools):

    python -m pip install grpcio-tools
    python environments/python/generate_protos.py

The generated code imports its siblings as `from chorus.v1 import ...`; this script rewrites
those imports to be relative so the modules live inside the chorus_env package.
"""

import pathlib
import re
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
OUT = HERE / "chorus_env" / "_proto"
PROTOS = ["chorus/v1/common.proto", "chorus/v1/environment.proto"]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    generated = OUT / "chorus" / "v1"
    for path in sorted(generated.glob("*.py")):
        text = path.read_text()
        text = re.sub(r"^from chorus\.v1 import ", "from . import ", text, flags=re.M)
        target = OUT / path.name
        target.write_text(text)
        print(f"wrote {target.relative_to(HERE)}")
    for path in sorted(generated.glob("*.py")):
        path.unlink()
    for directory in (generated, OUT / "chorus"):
        directory.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
