"""Regenerates the gRPC stubs of Chorus' Python packages from proto/chorus/v1/*.proto:
chorus_env/_proto/ (the environment SDK and the orchestrator client) and chorus_learner/_proto/ (the PyTorch learner).

The generated modules are committed so that `pip install` needs only grpcio and protobuf
from PyPI. Run this after changing a .proto file (it needs grpcio-tools 1.85.1, the version
the committed stubs were made with):

    python -m pip install grpcio-tools==1.85.1
    python scripts/generate-python-protos.py

The generated code imports its siblings as `from chorus.v1 import ...`; this script rewrites
those imports to be relative so the modules live inside each package.
"""

import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
TARGETS = {
    ROOT / "environments/python/chorus_env/_proto": [
        "chorus/v1/common.proto",
        "chorus/v1/environment.proto",
        "chorus/v1/orchestrator.proto",
    ],
    ROOT / "learner/python/chorus_learner/_proto": [
        "chorus/v1/common.proto",
        "chorus/v1/learner.proto",
        "chorus/v1/orchestrator.proto",
    ],
}


def main() -> int:
    for out, protos in TARGETS.items():
        if generate(out, protos) != 0:
            return 1
    return 0


def generate(OUT, PROTOS) -> int:
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
        print(f"wrote {target.relative_to(ROOT)}")
    for path in sorted(generated.glob("*.py")):
        path.unlink()
    for directory in (generated, OUT / "chorus"):
        directory.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
