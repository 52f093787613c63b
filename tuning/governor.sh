#!/usr/bin/env bash
# CPU frequency governor `performance` on every core: the verify shards and
# the consensus core run in bursts, and ramping up from a low frequency adds
# latency to every burst. Applied now with --apply and at every boot by a
# systemd-tmpfiles entry. Machines without cpufreq (many VMs) are skipped.
# Dry run by default; see tuning/common.sh for --apply and --root.
. "$(dirname "$0")/common.sh"

ensure_file /etc/tmpfiles.d/90-cybermesh-governor.conf "# CyberMesh validator (tuning/governor.sh)
w /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor - - - - performance" || true
found=0
for g in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor; do
  [ -e "$g" ] || continue
  found=1
  ensure_value "$g" performance
done
[ "$found" = 1 ] || [ "$LIVE" = 0 ] || say "skip: no cpufreq on this machine (a VM, or the firmware decides)"
finish
