#!/usr/bin/env bash
# Interrupts only on the housekeeping cores, so a NIC or disk interrupt never
# preempts a verify shard or the consensus core. Sets every movable IRQ's
# smp_affinity_list now (--apply), and tells irqbalance (if installed) to keep
# off the other cores, which also covers IRQs that appear later.
#   --housekeeping LIST   cores for interrupts, as the kernel writes lists
#                         (default 0; match tuning/cpu-layout.sh)
# Dry run by default; see tuning/common.sh for --apply and --root.
. "$(dirname "$0")/common.sh"

HK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --housekeeping) HK="$2"; shift ;;
    *) say "unknown option $1 (see --help)"; exit 2 ;;
  esac
  shift
done
case "$HK" in '' | *[!0-9,-]*) say "--housekeeping takes a core list such as 0 or 0-1, not '$HK'"; exit 2 ;; esac

# The cores that are not housekeeping, for irqbalance's banned list.
CORES=$(nproc --all)
declare -A IS_HK=()
IFS=, read -ra PARTS <<<"$HK"
for part in "${PARTS[@]}"; do
  for ((c = ${part%-*}; c <= ${part#*-}; c++)); do IS_HK[$c]=1; done
done
BANNED=""
for ((c = 0; c < CORES; c++)); do
  [ -n "${IS_HK[$c]:-}" ] || BANNED="${BANNED:+$BANNED,}$c"
done
if [ -z "$BANNED" ]; then
  say "every core is a housekeeping core on this $CORES-core host: nothing to move."
  finish
  exit 0
fi
if [ -f "$ROOT/etc/default/irqbalance" ] || command -v irqbalance >/dev/null 2>&1; then
  ensure_file /etc/default/irqbalance.d/90-cybermesh.conf "# tuning/irq-affinity.sh (source it from /etc/default/irqbalance)
IRQBALANCE_BANNED_CPULIST=$BANNED" || true
fi
if [ "$LIVE" = 1 ]; then
  for f in /proc/irq/[0-9]*/smp_affinity_list; do
    [ -e "$f" ] || continue
    have=$(cat "$f")
    [ "$have" = "$HK" ] && continue
    CHANGES=$((CHANGES + 1))
    if [ "$APPLY" = 1 ]; then
      # Some IRQs (per-CPU timers, managed queues) cannot move: say so, go on.
      echo "$HK" >"$f" 2>/dev/null && say "set $f: $have -> $HK" || say "cannot move $f (kernel-managed); left at $have"
    else
      say "would set $f: $have -> $HK"
    fi
  done
else
  say "skip (--root): live IRQ affinities"
fi
finish
