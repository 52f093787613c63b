#!/usr/bin/env bash
# Transparent huge pages: `madvise` (only where a program asks), defrag
# `defer+madvise`. With `always`, khugepaged compacts memory behind the
# validator's back and page faults can stall for milliseconds: commit latency
# spikes. The validator does not ask for huge pages, so it gets none.
# Applied now with --apply and at every boot by a systemd-tmpfiles entry.
# Dry run by default; see tuning/common.sh for --apply and --root.
. "$(dirname "$0")/common.sh"

THP=/sys/kernel/mm/transparent_hugepage
ensure_file /etc/tmpfiles.d/90-cybermesh-thp.conf "# CyberMesh validator (tuning/thp.sh)
w $THP/enabled - - - - madvise
w $THP/defrag - - - - defer+madvise" || true
ensure_value "$THP/enabled" madvise
ensure_value "$THP/defrag" defer+madvise
finish
