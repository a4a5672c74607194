#!/usr/bin/env bash
# The environment of benchmarks/yolo_vs_ultralytics.py's reference side: a separate venv with Ultralytics
# (never a detkit dependency, never installed in the project's .venv), torch/torchvision pinned by the
# project's constraints.txt (the preinstalled torch 2.13 CPU wheel cannot load torchvision's ops), and detkit
# itself (editable, same constraints) so that this venv can also import detkit's evaluator.
#
#   bash benchmarks/setup_ultralytics.sh            # creates/updates benchmarks/.venv-ultralytics
#   VENV=/elsewhere PYTHON=python3.11 bash benchmarks/setup_ultralytics.sh
#
# Idempotent: a stamp file skips the install while this script and constraints.txt are unchanged.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/benchmarks/.venv-ultralytics}"
PYTHON="${PYTHON:-python3}"
ULTRALYTICS_VERSION="${ULTRALYTICS_VERSION:-8.4.190}"   # the version the README's numbers were taken with
CONSTRAINTS="$ROOT/constraints.txt"
STAMP="$VENV/.installed-stamp"
PY="$VENV/bin/python"

want="ultralytics==$ULTRALYTICS_VERSION $(sha256sum "$CONSTRAINTS" "${BASH_SOURCE[0]}" | cut -c1-16 | tr '\n' ' ')"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "$VENV is up to date ($want)"
    exit 0
fi

if [[ "$(realpath -m "$VENV")" == "$(realpath -m "$ROOT/.venv")" ]]; then
    echo "refusing to install ultralytics into the project's own venv ($ROOT/.venv)" >&2
    exit 1
fi

[[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$PY" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS")

# torch/torchvision first, exactly as pinned (the ~5.5 GB CUDA build: it runs on a CPU-only machine too)
"${PIP[@]}" torch torchvision
# ultralytics with its own requirements; anything constraints.txt pins (numpy, opencv's deps, matplotlib,
# scipy, pillow, pyyaml, ...) keeps the project's version
"${PIP[@]}" "ultralytics==$ULTRALYTICS_VERSION"
# detkit itself (editable: the working tree), so that this venv can score with detkit's evaluator
"${PIP[@]}" -e "$ROOT"

# Check: both import, torchvision's compiled ops load, and ultralytics did not replace the pinned torch.
YOLO_OFFLINE=1 YOLO_CONFIG_DIR="$VENV/ultralytics-config" "$PY" - <<'EOF'
import torch, torchvision, ultralytics, detkit
from torchvision.ops import nms
nms(torch.rand(4, 4) * 10, torch.rand(4), 0.5)
print(f"ok: torch {torch.__version__}, torchvision {torchvision.__version__}, ultralytics {ultralytics.__version__}, "
      f"detkit {getattr(detkit, '__version__', '?')}")
EOF
"$PY" -m pip check || echo "warning: pip check reports conflicts (above)" >&2
echo "$want" > "$STAMP"
echo "ready: $PY"
