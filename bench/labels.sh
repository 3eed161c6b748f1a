#!/usr/bin/env bash
# Labels: batched engine vs the reference one-feature-at-a-time loop, same features, same run
# (target ratio >= 20, max_abs_diff <= 1e-4 over every label column; float64 so that rounding
# cannot flip a thresholded count). Usage: bench/labels.sh [OUT_DIR]   (writes labels.json)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench}"
mkdir -p "$out"
HF_HUB_OFFLINE=1 steerscope bench labels --json "$out/labels.json"
