#!/usr/bin/env bash
# Every tuning script in turn, with the same options (dry run by default):
#   tuning/all.sh                 show what would change
#   sudo tuning/all.sh --apply    change it
# cpu-layout.sh and irq-affinity.sh take their own layout options; run them
# separately to choose a layout (see tuning/README.md).
set -euo pipefail
dir="$(dirname "$0")"
for s in sysctl limits thp governor cpu-layout irq-affinity; do
  "$dir/$s.sh" "$@"
done
