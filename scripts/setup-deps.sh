#!/usr/bin/env bash
# Installs and starts what the test suite needs. Idempotent: fast when
# everything is already installed and running.
#   - cargo-nextest (test runner)
#   - PostgreSQL 15 from Debian, started, with role/database `cybermesh`
#   - the `nisshi` Kafka-protocol broker from crates.io, started on 127.0.0.1:9092
#   - rdkafka's C build dependencies (Debian) and the Python example clients' packages (PyPI)
#   - Prometheus and promtool (Debian), for the shipped alert rules' tests
#   - tmux (Debian), for the monitor's terminal test
# Environment written for the tests: target/test-env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[setup] %s\n' "$*"; }

export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v cargo-nextest >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

# --- systemd-analyze (the unit file test) ----------------------------------
if ! command -v systemd-analyze >/dev/null 2>&1; then
  log "installing systemd (for systemd-analyze) from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

# --- tmux (tests/monitor.rs: `cybermesh monitor` in a real terminal) ------
if ! command -v tmux >/dev/null 2>&1; then
  log "installing tmux from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null
fi

# --- Prometheus and promtool (tests/prometheus.rs: the shipped rules, a real scrape)
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  log "installing prometheus (with promtool) from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# --- C build dependencies of rdkafka (bundled librdkafka with OpenSSL) -------
if ! dpkg -s libssl-dev pkg-config zlib1g-dev make gcc >/dev/null 2>&1; then
  log "installing libssl-dev, pkg-config, zlib1g-dev, make, gcc from Debian (for rdkafka)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config zlib1g-dev make gcc >/dev/null
fi

# --- Python example clients (examples/python, run by tests/kafka.rs) -------
if ! python3 -c "import confluent_kafka, cryptography, google.protobuf, grpc_tools" >/dev/null 2>&1; then
  log "installing confluent-kafka, cryptography, protobuf, grpcio-tools from PyPI"
  python3 -m pip install -q --root-user-action=ignore confluent-kafka cryptography protobuf grpcio-tools
fi

# --- PostgreSQL -------------------------------------------------------------
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  log "installing PostgreSQL from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_VER=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)
if [ -z "$PG_VER" ]; then
  log "no PostgreSQL cluster found; creating one"
  PG_VER=$(ls /usr/lib/postgresql | sort -n | tail -1)
  pg_createcluster "$PG_VER" main >/dev/null
fi
if ! pg_lsclusters -h | awk -v v="$PG_VER" '$1==v && $2=="main" {print $4}' | grep -q online; then
  log "starting PostgreSQL $PG_VER"
  pg_ctlcluster --skip-systemctl-redirect "$PG_VER" main start
fi
su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='cybermesh'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"CREATE ROLE cybermesh LOGIN SUPERUSER PASSWORD 'cybermesh'\""
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='cybermesh'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"CREATE DATABASE cybermesh OWNER cybermesh\""
PG_PORT=$(pg_lsclusters -h | awk -v v="$PG_VER" '$1==v && $2=="main" {print $3}')

# --- Kafka-protocol broker: nisshi 0.8.1 --------------------------------------
if ! nisshi --version 2>/dev/null | grep -q '0.8.1'; then
  log "installing nisshi 0.8.1 from crates.io (about 15-20 min cold)"
  cargo install nisshi --version 0.8.1 --locked --ignore-rust-version \
    --no-default-features --features dynostore,postgres
fi
mkdir -p target
if ! (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null; then
  log "starting nisshi on 127.0.0.1:9092"
  nohup nisshi broker --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://nisshi/ --group-initial-rebalance-delay 100ms \
    >target/nisshi.log 2>&1 &
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null && break
    sleep 0.1
  done
  (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null || { log "nisshi did not start; see target/nisshi.log"; exit 1; }
fi

cat >target/test-env.sh <<ENV
export CYBERMESH_TEST_DB_DSN="postgresql://cybermesh:cybermesh@127.0.0.1:${PG_PORT}/cybermesh"
export CYBERMESH_TEST_KAFKA_BROKERS="127.0.0.1:9092"
ENV
log "ready: PostgreSQL $PG_VER on port $PG_PORT, nisshi on 127.0.0.1:9092"
