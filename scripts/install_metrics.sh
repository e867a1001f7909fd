#!/usr/bin/env bash
# Install the real-preset metrics extra spo[metrics] (open_clip for HPSv2.1) with the torchvision build that
# matches the installed torch. A plain `pip install 'spo[metrics]'` would take PyPI's torchvision, a CUDA build,
# which fails to import beside a CPU torch ("operator torchvision::nms does not exist") and then breaks
# transformers' image processors too. Choice, for torch X.Y.Z (torchvision 0.(Y+15).Z unless TORCHVISION_VERSION):
#   - TORCHVISION_INDEX_URL set: torchvision from that index;
#   - torch is PyPI's default build (no "+" local tag, CUDA on Linux): PyPI's torchvision;
#   - torch is "+cuNNN" / "+cpu": torchvision "+cuNNN" / "+cpu" from pip's configured sources if they have it,
#     else from the PyTorch index for that build.
# The installed torchvision is imported before the extra goes in; one that does not import is removed again
# and the script fails (or, with METRICS_OPTIONAL=1, warns and installs nothing), never leaving it broken.
set -euo pipefail
PIP="${1:?usage: install_metrics.sh PATH/TO/pip [PROJECT_DIR]}"
PROJECT="${2:-.}"
PY="${PIP%/pip}/python"
PYTORCH_INDEX="https://download.pytorch.org/whl"

read -r torch_version torch_tag < <("$PY" -c '
import torch
v = torch.__version__
print(v.split("+")[0], v.split("+")[1] if "+" in v else "-")')
IFS=. read -r t_major t_minor t_patch <<<"$torch_version"
tv_version="${TORCHVISION_VERSION:-0.$((t_minor + 15)).${t_patch}}"
[[ "$t_major" == 2 ]] || { echo "install_metrics: torch $torch_version: set TORCHVISION_VERSION" >&2; exit 2; }

tv_ok() {
  "$PY" -c 'import torchvision, torchvision.transforms; from torchvision.ops import nms' >/dev/null 2>&1
}
fail() {
  echo "install_metrics: $*" >&2
  if [[ "${METRICS_OPTIONAL:-0}" == 1 ]]; then
    echo "install_metrics: METRICS_OPTIONAL=1: continuing without spo[metrics] (HPSv2.1 unavailable)" >&2
    exit 0
  fi
  exit 1
}

start=$(date +%s)
if tv_ok && [[ "$("$PY" -c 'import torchvision; print(torchvision.__version__.split("+")[0])')" == "$tv_version" ]]; then
  echo "torchvision already installed and importable: $("$PY" -c 'import torchvision; print(torchvision.__version__)')"
else
  "$PIP" uninstall --quiet --yes torchvision >/dev/null 2>&1 || true
  if [[ -n "${TORCHVISION_INDEX_URL:-}" ]]; then
    attempts=("torchvision==${tv_version} --index-url ${TORCHVISION_INDEX_URL} --extra-index-url https://pypi.org/simple")
  elif [[ "$torch_tag" == "-" ]]; then
    attempts=("torchvision==${tv_version}")
  else
    # pip's own sources first (a local wheel mirror may carry the build), then PyTorch's index for the build.
    attempts=(
      "torchvision==${tv_version}+${torch_tag}"
      "torchvision==${tv_version}+${torch_tag} --index-url ${PYTORCH_INDEX}/${torch_tag} --extra-index-url https://pypi.org/simple"
    )
  fi
  installed=0
  for args in "${attempts[@]}"; do
    echo "installing ${args} (to match torch ${torch_version}+${torch_tag/-/pypi})"
    # shellcheck disable=SC2086  # args is a list of pip arguments
    if PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-30}" "$PIP" install --quiet --retries 1 --no-deps $args 2>/tmp/install_metrics.$$.log; then
      if tv_ok; then installed=1; break; fi
      echo "  installed, but it does not import beside torch ${torch_version}+${torch_tag}: removing it" >&2
      "$PIP" uninstall --quiet --yes torchvision >/dev/null 2>&1 || true
    else
      echo "  not available ($(tail -n 1 /tmp/install_metrics.$$.log))" >&2
    fi
  done
  rm -f /tmp/install_metrics.$$.log
  if [[ "$installed" != 1 ]]; then
    fail "no torchvision ${tv_version} build for torch ${torch_version}+${torch_tag} could be installed. Point" \
      "TORCHVISION_INDEX_URL at an index that has it (e.g. ${PYTORCH_INDEX}/cpu), or put its wheel where pip" \
      "finds it (pip config: find-links), then rerun: bash scripts/install_metrics.sh ${PIP}"
  fi
fi
# torchvision is satisfied now, so pip keeps it; --no-build-isolation is not needed (pure-Python packages).
"$PIP" install --quiet -e "${PROJECT}[metrics]"
"$PY" -c 'import open_clip, torchvision; print(f"spo[metrics] ready: open_clip {open_clip.__version__}, torchvision {torchvision.__version__}")'
echo "install_metrics: $(($(date +%s) - start)) s"
