#!/usr/bin/env bash
# One prepared command for a lent GPU with no network (bench/RESULTS.md, "GPU check"):
#
#   bash bench/gpu/check.sh              # real sizes on the GPU, <= 8 min; results in $OUT (or ./gpu_check_out)
#   bash bench/gpu/check.sh --dry-run    # toy sizes on the CPU, seconds (tests/integration/test_gpu_check.py)
#
# 1. Python packages the GPU image lacks (diffusers, pydantic, ruamel.yaml, ...) are installed from the wheels
#    `make gpu-wheels` puts in bench/gpu/wheels (carry that folder), only when they do not import already; pip
#    resolves against what is installed, so a wheel whose package is there in a suitable version is left alone.
# 2. The repository itself is installed with --no-deps (its pins do not apply there; PYTHONPATH covers a
#    failure).
# 3. The real 49,408-token CLIP vocabulary is read out of the carried open_clip wheel (never installed).
# 4. bench/gpu/check.py runs inside what is left of the 8 minutes, under a hard timeout.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS_DIR:-bench/gpu/wheels}
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=true
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done

# find_spec, not import: importing diffusers costs seconds, and check.py reports any import failure itself.
installed='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))'
needed="diffusers pydantic pydantic_core ruamel.yaml importlib_metadata"
# shellcheck disable=SC2086
if "$PY" -c "$installed" $needed 2>/dev/null; then
  echo "[gpu-check] diffusers/pydantic/ruamel.yaml are installed: no wheel install"
else
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "[gpu-check] missing packages and no wheels in $WHEELS: run 'make gpu-wheels' where PyPI is reachable," \
         "then call the run tool with carry: [\"bench/gpu/wheels\"]" >&2
    exit 2
  fi
  # Names, not files: pip installs only the ones missing (or too old) on this machine.
  names=$(cd "$WHEELS" && ls *.whl | sed 's/-.*//' | grep -v '^open_clip_torch$' | sort -u | tr '\n' ' ')
  echo "[gpu-check] installing from $WHEELS where missing: $names"
  # shellcheck disable=SC2086
  if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-cache-dir $names; then
    # A read-only environment: every carried wheel into a side folder instead (newer ones shadow older).
    echo "[gpu-check] pip into the environment failed; installing into /tmp/spo_gpu_site" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spo_gpu_site \
      $(ls "$WHEELS"/*.whl | grep -v open_clip_torch) || exit 3
    export PYTHONPATH="$PYTHONPATH:/tmp/spo_gpu_site"
  fi
  "$PY" -c 'import diffusers, pydantic, ruamel.yaml' || { echo "[gpu-check] still no import after the install" >&2; exit 3; }
fi

if ! "$PY" -c 'import importlib.metadata as m; m.version("spo")' 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "[gpu-check] pip install -e . failed; running from PYTHONPATH=$REPO"
fi

if [ -z "${SPO_BPE_VOCAB:-}" ] && [ "$dry" = 0 ]; then
  whl=$(ls "$WHEELS"/open_clip_torch-*.whl 2>/dev/null | head -n 1)
  if [ -n "$whl" ]; then
    mkdir -p /tmp/spo_gpu_check
    "$PY" - "$whl" <<'EOF' && export SPO_BPE_VOCAB=/tmp/spo_gpu_check/bpe_simple_vocab_16e6.txt.gz
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
name = next(n for n in z.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
open("/tmp/spo_gpu_check/bpe_simple_vocab_16e6.txt.gz", "wb").write(z.read(name))
EOF
  fi
fi

budget=$((TOTAL_S - SECONDS))
[ "$dry" = 1 ] && budget=60
echo "[gpu-check] $SECONDS s of setup; check.py budget ${budget} s"
exec timeout -k 10 $((budget + 45)) "$PY" bench/gpu/check.py --budget-s "$budget" "$@"
