#!/usr/bin/env bash
# Regenerates the Python stubs in aitl_client/ from ../../proto.
# Run with the python that has requirements.txt installed (or set PYTHON).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto_root="$(cd "$here/../../proto" && pwd)"
out="$here/aitl_client"
python="${PYTHON:-python3}"

# grpc_tools ships google/protobuf/*.proto (Timestamp, Duration) next to itself.
wkt_include="$("$python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

# Start clean so stubs of removed protos do not linger.
rm -rf "$out/aitl"
mkdir -p "$out"

"$python" -m grpc_tools.protoc \
  -I "$proto_root" -I "$wkt_include" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$proto_root"/aitl/v1/*.proto

touch "$out/aitl/__init__.py" "$out/aitl/v1/__init__.py"

# protoc writes absolute imports (`from aitl.v1 import ...`); anchor them under
# aitl_client so the package works without touching sys.path.
find "$out/aitl" \( -name '*.py' -o -name '*.pyi' \) -print0 |
  xargs -0 sed -i -E 's/^from aitl\.v1 import /from aitl_client.aitl.v1 import /'
