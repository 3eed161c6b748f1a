#!/usr/bin/env bash
# Predictor pass vs model forward + SAE encode (target ratio >= 0.7, plus a synthetic
# 131,072-wide SAE memory check: peak RSS <= 4 GB), and batched output scores of every feature
# vs one hooked forward per feature (target ratio >= 50, max_abs_diff <= 1e-5).
# Usage: bench/predictors.sh [OUT_DIR]   (writes predictors.json and output-scores.json)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench}"
mkdir -p "$out"
HF_HUB_OFFLINE=1 steerscope bench predictors --json "$out/predictors.json"
HF_HUB_OFFLINE=1 steerscope bench output-scores --json "$out/output-scores.json"
