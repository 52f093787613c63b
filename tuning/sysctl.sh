#!/usr/bin/env bash
# Kernel network and memory settings for a validator host, kept in
# /etc/sysctl.d/90-cybermesh.conf (loaded at every boot; --apply also loads it
# now). Why each value:
#   net.core.{r,w}mem_max 8 MiB   quinn asks for large UDP socket buffers for
#                                 QUIC between validators; the kernel silently
#                                 caps them at these limits (default 208 KiB),
#                                 and a full buffer drops votes under load.
#   net.core.{r,w}mem_default 1 MiB  the same for sockets that do not ask.
#   net.core.netdev_max_backlog   datagram bursts while a core is busy.
#   net.core.somaxconn            Kafka, PostgreSQL and API connections.
#   fs.file-max                   block store segments, sockets, Kafka.
#   vm.swappiness = 1             keep the mempool and state resident.
# Dry run by default; see tuning/common.sh for --apply and --root.
. "$(dirname "$0")/common.sh"

FILE=/etc/sysctl.d/90-cybermesh.conf
if ensure_file "$FILE" "# CyberMesh validator host (tuning/sysctl.sh)
net.core.rmem_max = 8388608
net.core.wmem_max = 8388608
net.core.rmem_default = 1048576
net.core.wmem_default = 1048576
net.core.netdev_max_backlog = 16384
net.core.somaxconn = 4096
fs.file-max = 2097152
vm.swappiness = 1"; then
  if [ "$APPLY" = 1 ] && [ "$LIVE" = 1 ]; then
    sysctl -q -p "$FILE" || say "some settings were refused (e.g. inside a container); the file stays for the next boot"
  fi
fi
finish
