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
# Criterion in a short mode, each bench's ratio against the committed
# baseline printed (a warning past the threshold, never a failure: CI
# machines differ in CPU kind; see README "Criterion baseline").
scripts/bench-compare.sh
# The fuzz targets are run by hand (nightly, cargo-fuzz); checking them on
# stable here keeps them compiling against today's decoders.
cargo check --quiet --manifest-path fuzz/Cargo.toml --bins
cargo nextest run --workspace --no-fail-fast "$@"
