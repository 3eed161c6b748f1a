#!/usr/bin/env bash
# Steered vs unsteered generation: per-token time, both with the KV cache, same prompts.
# Target: ratio = steered / unsteered ≤ 1.10. Usage: bench/generation.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/generation.json}"
HF_HUB_OFFLINE=1 steerscope bench generation --json "$out"
