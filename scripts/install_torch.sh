#!/usr/bin/env bash
# Install torch into the venv before the project, choosing the build for this machine:
#   - TORCH_INDEX_URL set: use that index (e.g. https://download.pytorch.org/whl/cu128 or .../whl/cpu);
#   - an NVIDIA GPU (nvidia-smi works): PyPI's default Linux wheel, which is the CUDA build;
#   - otherwise the CPU build: a local/pip-configured CPU wheel when pip resolves one ("+cpu"),
#     else PyTorch's CPU index (an unpinned PyPI torch would pull several GB of CUDA libraries).
set -euo pipefail
PIP="${1:?usage: install_torch.sh PATH/TO/pip}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

if "${PIP%/pip}/python" -c "import torch" 2>/dev/null; then
  echo "torch already installed: $("${PIP%/pip}/python" -c 'import torch; print(torch.__version__)')"
  exit 0
fi
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  echo "installing torch==${TORCH_VERSION} from ${TORCH_INDEX_URL}"
  exec "$PIP" install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "GPU found: installing the CUDA build torch==${TORCH_VERSION} from PyPI"
  exec "$PIP" install "torch==${TORCH_VERSION}"
fi
resolved=$("$PIP" install --dry-run --quiet --report - "torch==${TORCH_VERSION}" 2>/dev/null \
  | "${PIP%/pip}/python" -c 'import json,sys; r=json.load(sys.stdin); print(" ".join(i["metadata"]["version"] for i in r["install"] if i["metadata"]["name"]=="torch"))' || true)
if [[ "$resolved" == *"+cpu"* ]]; then
  echo "no GPU: installing the CPU build torch==${resolved}"
  exec "$PIP" install "torch==${TORCH_VERSION}"
fi
echo "no GPU: installing the CPU build torch==${TORCH_VERSION} from ${CPU_INDEX}"
exec "$PIP" install "torch==${TORCH_VERSION}" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
