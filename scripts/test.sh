#!/usr/bin/env bash
# The whole test suite: dependencies (idempotent), then every test with
# nextest, then the criterion benches in a short mode so they are exercised.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# Incremental caches only help repeated local builds; CI builds once.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
scripts/setup-deps.sh
# shellcheck disable=SC1091
source target/test-env.sh
cargo nextest run --workspace --no-fail-fast "$@"
# Benches as tests: each runs once, checks it works, measures nothing.
cargo test --bench hot_paths
