#!/usr/bin/env bash
# CPU layout for the validators on this host: which cores run what, the
# matching `[runtime]` settings for each validator's TOML, a systemd drop-in
# per instance (CPUAffinity), and a kernel command line that keeps the
# scheduler, timer ticks and RCU callbacks off the validators' cores.
#   --instances K     validators on this host, ids 1..K (default 1)
#   --shards S        verify shards per validator (default 2)
#   --housekeeping N  cores left to the OS, IRQs and each validator's other
#                     threads: net (QUIC), Kafka, egress, mirror, API (default 1)
#   --cores C         cores on the host (default: what the kernel reports)
# Layout in core order: the housekeeping cores, then per validator one
# consensus core (`runtime.core_core`) and S verify cores
# (`runtime.verify_cores`). The kernel command line takes effect after
# `update-grub` and a reboot; the script never reboots.
# Dry run by default; see tuning/common.sh for --apply and --root.
. "$(dirname "$0")/common.sh"

INSTANCES=1 SHARDS=2 HOUSEKEEPING=1 CORES=$(nproc --all)
while [ $# -gt 0 ]; do
  case "$1" in
    --instances) INSTANCES="$2"; shift ;;
    --shards) SHARDS="$2"; shift ;;
    --housekeeping) HOUSEKEEPING="$2"; shift ;;
    --cores) CORES="$2"; shift ;;
    *) say "unknown option $1 (see --help)"; exit 2 ;;
  esac
  shift
done
for v in INSTANCES SHARDS HOUSEKEEPING CORES; do
  case "${!v}" in '' | *[!0-9]*) say "--$(echo "$v" | tr A-Z a-z) must be a number, not '${!v}'"; exit 2 ;; esac
done
[ "$INSTANCES" -ge 1 ] && [ "$SHARDS" -ge 1 ] && [ "$HOUSEKEEPING" -ge 1 ] || { say "instances, shards and housekeeping must be at least 1"; exit 2; }

NEED=$((HOUSEKEEPING + INSTANCES * (1 + SHARDS)))
if [ "$NEED" -gt "$CORES" ]; then
  say "this host has $CORES cores; $INSTANCES validator(s) with $SHARDS shards and $HOUSEKEEPING housekeeping core(s) need $NEED to pin and isolate."
  say "leave runtime.pin_cores = false (the default): threads share the cores and park when idle."
  finish
  exit 0
fi

say "host: $CORES cores; housekeeping (OS, IRQs, net/Kafka/mirror/API threads): 0-$((HOUSEKEEPING - 1))"
next=$HOUSEKEEPING
ISOLATED=()
for i in $(seq 1 "$INSTANCES"); do
  core=$next
  verify=$(seq -s ', ' $((core + 1)) $((core + SHARDS)))
  next=$((core + 1 + SHARDS))
  ISOLATED+=("$core-$((next - 1))")
  say "validator $i: consensus core $core, verify cores $verify; in /etc/cybermesh/validator-$i.toml:"
  printf '    [runtime]\n    pin_cores = true\n    verify_shards = %s\n    core_core = %s\n    verify_cores = [%s]\n' \
    "$SHARDS" "$core" "$verify"
  # The process may run on its own cores and the housekeeping ones (its
  # unpinned threads); the pinned threads then choose theirs.
  ensure_file "/etc/systemd/system/cybermesh@$i.service.d/10-cpu.conf" "# tuning/cpu-layout.sh: validator $i
[Service]
CPUAffinity=0-$((HOUSEKEEPING - 1)) $core-$((next - 1))" || true
done
LIST=$(IFS=,; echo "${ISOLATED[*]}")
ensure_file /etc/default/grub.d/90-cybermesh-isolcpus.cfg "# tuning/cpu-layout.sh: keep the validators' cores for them (run update-grub, then reboot)
GRUB_CMDLINE_LINUX_DEFAULT=\"\$GRUB_CMDLINE_LINUX_DEFAULT isolcpus=managed_irq,domain,$LIST nohz_full=$LIST rcu_nocbs=$LIST\"" || true
if [ "$APPLY" = 1 ] && [ "$LIVE" = 1 ] && command -v systemctl >/dev/null; then
  systemctl daemon-reload 2>/dev/null || say "systemctl daemon-reload failed (no systemd running?)"
fi
say "move IRQs off the isolated cores with: tuning/irq-affinity.sh --housekeeping 0-$((HOUSEKEEPING - 1))"
finish
