#!/usr/bin/env bash
# Runs the whole-node simulator's random seeds on every core for a while and
# prints seeds/hour and each failing seed (replay one with SIM_SEED=n).
#
#   scripts/soak.sh [--duration 1h] [--from N] [--jobs J] [--chunk C] [--replica]
#
# --duration  how long (humantime-ish: 90s, 30m, 1h; default 10m)
# --from      the first seed (default: a random 40-bit number, printed)
# --jobs      parallel runners (default: the number of cores)
# --chunk     seeds per runner invocation (default 20000)
# --replica   soak the replica-only simulator (consensus::sim) instead
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10m from="" jobs=$(nproc) chunk=20000 test=whole_nodes_stay_safe_and_live_under_random_faults
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --chunk) chunk=$2; shift 2 ;;
    --replica) test=sim_random_faults_many_seeds; shift ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$duration" in
  *h) secs=$(( ${duration%h} * 3600 )) ;;
  *m) secs=$(( ${duration%m} * 60 )) ;;
  *s) secs=${duration%s} ;;
  *[!0-9]*|"") echo "soak.sh: --duration $duration: use e.g. 90s, 30m or 1h" >&2; exit 2 ;;
  *) secs=$duration ;;
esac
[ -n "$from" ] || from=$(( (RANDOM << 25 | RANDOM << 10 | RANDOM) & 0xffffffffff ))

bin=$(cargo test --release --lib --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["lib"]: print(m["executable"])' | tail -1)
[ -x "$bin" ] || { echo "soak.sh: building the test binary failed (run cargo test --release --lib --no-run)" >&2; exit 1; }

out=$(mktemp -d)
echo "soak: $test, $jobs runners, seeds from $from in chunks of $chunk, for ${secs}s; logs in $out"
start=$(date +%s) next=$from
declare -A pids=()
run_chunk() { # seed_from log
  SIM_SEED_FROM=$1 SIM_SEEDS=$chunk "$bin" --exact "${test_path}" --nocapture >"$2" 2>&1 && echo ok >>"$2.rc" || echo fail >>"$2.rc"
}
case $test in
  whole_*) test_path=sim::cluster::tests::$test ;;
  *) test_path=consensus::sim::tests::$test ;;
esac
done_seeds=0 failures=0
while :; do
  now=$(date +%s)
  for p in "${!pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      log=${pids[$p]}; unset "pids[$p]"
      if grep -q ok "$log.rc"; then
        done_seeds=$((done_seeds + chunk))
      else
        failures=$((failures + 1))
        echo "FAILED: $(grep -m1 -o 'seed [0-9]* (.*replay with SIM_SEED=[0-9]*' "$log" | sed 's/ (Config.*)//' || echo "see $log")"
        grep -m1 -A2 'panicked' "$log" | head -3
      fi
    fi
  done
  if [ $((now - start)) -ge "$secs" ]; then
    [ ${#pids[@]} -eq 0 ] && break
  elif [ ${#pids[@]} -lt "$jobs" ]; then
    log=$out/$next.log
    run_chunk "$next" "$log" & pids[$!]=$log
    next=$((next + chunk))
    continue
  fi
  sleep 1
done
elapsed=$(( $(date +%s) - start ))
echo "soak: $done_seeds seeds passed from $from ($((done_seeds * 3600 / (elapsed > 0 ? elapsed : 1))) seeds/hour on $jobs runners, $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); $failures failing chunk(s)"
[ "$failures" -eq 0 ]
