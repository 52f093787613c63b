-- CyberMesh mirror schema, version 1 (PostgreSQL and CockroachDB).
-- The validator's block store is the source of truth; these tables are a
-- downstream copy written idempotently (ON CONFLICT DO NOTHING).

CREATE TABLE IF NOT EXISTS blocks (
    height        BIGINT PRIMARY KEY,
    block_hash    BYTEA NOT NULL,
    state_root    BYTEA NOT NULL,
    previous_hash BYTEA NOT NULL,
    timestamp_ms  BIGINT NOT NULL,
    tx_count      INT NOT NULL,
    proposer_id   BYTEA NOT NULL,
    block_view    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS blocks_block_hash_idx ON blocks (block_hash);

CREATE TABLE IF NOT EXISTS transactions (
    tx_id         UUID PRIMARY KEY,
    block_height  BIGINT NOT NULL REFERENCES blocks (height),
    tx_index      INT NOT NULL,
    tx_type       TEXT NOT NULL,
    content_hash  BYTEA NOT NULL,
    payload       BYTEA NOT NULL,
    producer_id   BYTEA NOT NULL,
    nonce         BYTEA NOT NULL,
    signature     BYTEA NOT NULL,
    timestamp_ms  BIGINT NOT NULL,
    status        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transactions_content_hash_idx ON transactions (content_hash);
CREATE INDEX IF NOT EXISTS transactions_nonce_idx ON transactions (nonce);
CREATE INDEX IF NOT EXISTS transactions_block_height_idx ON transactions (block_height);

CREATE TABLE IF NOT EXISTS anomalies (
    anomaly_id    UUID PRIMARY KEY,
    anomaly_type  TEXT NOT NULL,
    severity      INT NOT NULL,
    confidence    DOUBLE PRECISION NOT NULL,
    source        TEXT NOT NULL,
    block_height  BIGINT NOT NULL REFERENCES blocks (height),
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS anomalies_anomaly_type_idx ON anomalies (anomaly_type);
CREATE INDEX IF NOT EXISTS anomalies_block_height_idx ON anomalies (block_height);

CREATE TABLE IF NOT EXISTS validators (
    validator_id  BIGINT PRIMARY KEY,
    public_key    BYTEA NOT NULL,
    reputation    DOUBLE PRECISION NOT NULL,
    is_active     BOOLEAN NOT NULL,
    joined_view   BIGINT NOT NULL
);

-- The highest height mirrored (with every height below it), written in the
-- same transaction as the rows.
CREATE TABLE IF NOT EXISTS mirror_cursor (
    id      INT PRIMARY KEY,
    height  BIGINT NOT NULL
);
INSERT INTO mirror_cursor (id, height) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
