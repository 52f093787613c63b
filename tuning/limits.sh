#!/usr/bin/env bash
# Open-file and locked-memory limits for a validator started outside systemd
# (the unit sets LimitNOFILE/LimitMEMLOCK itself): the block store, QUIC and
# Kafka sockets and PostgreSQL connections need more than the usual 1024
# descriptors; each glommio verify shard locks RUNTIME_IO_MEMORY_BYTES
# (1 MiB) for io_uring, beyond the usual 64 KiB-8 MiB memlock limit once
# several validators run as one user. Written to /etc/security/limits.d/90-cybermesh.conf for the
# `cybermesh` user (pam_limits applies it at the next login).
# Dry run by default; see tuning/common.sh for --apply and --root.
. "$(dirname "$0")/common.sh"

ensure_file /etc/security/limits.d/90-cybermesh.conf "# CyberMesh validator (tuning/limits.sh)
cybermesh soft nofile 65536
cybermesh hard nofile 65536
cybermesh soft memlock unlimited
cybermesh hard memlock unlimited" || true
finish
