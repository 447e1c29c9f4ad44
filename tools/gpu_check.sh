#!/usr/bin/env bash
# One GPU check of mim: every pretraining method and SAE variant trains a few steps in bf16, the feature
# extraction writes a store, then tools/bench_{pretrain,sae,extract}.py run; one markdown table on stdout
# (Lightning's own output goes to stderr). About 8 minutes on one GPU. The Python part: tools/gpu_check.py.
#
#   bash tools/gpu_check.sh                                  # $PYTHON, else .venv/bin/python, else python3
#   SPCONV_WHEELS=/path/to/wheels bash tools/gpu_check.sh    # installs spconv-cu126 + cumm-cu126 from there
#   bash tools/gpu_check.sh --steps 20 --budget 600          # other arguments go to gpu_check.py
#   bash tools/gpu_check.sh --dry-run                        # the plan only (no GPU needed)
#
# Steps: refuse without a CUDA GPU (exit 2), install mim when it is not importable (pip, keeping the
# machine's torch), install spconv's GPU wheel from a local wheel folder when given, set the environment
# (fused attention, allocator, compile cache), run tools/gpu_check.py. Exit code: 0 all rows ok, 1 a row
# failed, 2 no GPU / no mim.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3); fi
fi

dry_run=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry_run=1; done

if [[ $dry_run == 0 ]] && ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: error: $PYTHON has no torch that sees a CUDA GPU (torch.cuda.is_available() is False)." \
       "Fix: run this on a CUDA machine; to test the script on a CPU: $PYTHON tools/gpu_check.py --device cpu --tiny" >&2
  exit 2
fi

# mim itself: the machine's torch stays (no constraints file here: it pins the CPU session's torch)
if ! "$PYTHON" -c "import mim, lightning, timm, safetensors, albumentations" 2>/dev/null; then
  echo "gpu_check.sh: installing mim into $PYTHON (pip install -e .)" >&2
  if ! "$PYTHON" -m pip install -q -e . >&2; then
    echo "gpu_check.sh: error: mim is not importable and 'pip install -e .' failed (no package index reachable?)." \
         "Fix: install mim's dependencies from a local index or wheel folder (pip install --no-index" \
         "--find-links DIR -e .), or point PYTHON at an environment that has them." >&2
    exit 2
  fi
fi

# spconv's GPU build for SparK's spconv backend, only from a local wheel folder (the machine may be offline)
if [[ -n "${SPCONV_WHEELS:-}" ]] && ! "$PYTHON" -c "import spconv" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --find-links "$SPCONV_WHEELS" spconv-cu126 cumm-cu126 >&2 \
    || echo "gpu_check.sh: warning: could not install spconv-cu126 from $SPCONV_WHEELS; the spconv row is skipped." >&2
fi

export TIMM_FUSED_ATTN=${TIMM_FUSED_ATTN:-1}                  # timm ViTs: F.scaled_dot_product_attention
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/mim_inductor_cache}
export JSONARGPARSE_DEPRECATION_WARNINGS=off

exec "$PYTHON" tools/gpu_check.py "$@"
