#!/usr/bin/env bash
# Criterion in a short mode (0.3 s warm-up, 1 s per bench), then each bench's
# ratio against the committed baseline (benches/baseline.json).
#   scripts/bench-compare.sh          compare (prints warnings, exits 0)
#   scripts/bench-compare.sh --save   make this run the new baseline
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
rm -rf target/criterion # results of benches since renamed would linger
cargo bench --bench hot_paths -- --warm-up-time 0.3 --measurement-time 1 --noplot
python3 scripts/bench_compare.py "$@"
