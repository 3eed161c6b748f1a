#!/usr/bin/env bash
# Sensitivity sweeps vs the per-direction, per-length full-forward loop, same directions and
# lengths (the paper's normal grid), same run. (a) last position: batched replay over the cached
# clean prefix, target ratio >= 10 with max_abs_diff <= 1e-5 in per-token KL; (b) all positions:
# forwards that skip the blocks below the site, ratio_all_positions reported (ceiling
# n_layers / (n_layers - first changed block) = 2 on the embedded model).
# Usage: bench/sensitivity.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/sensitivity.json}"
HF_HUB_OFFLINE=1 steerscope bench sensitivity --json "$out"
