#!/usr/bin/env python3
"""Example detector: publishes signed anomalies to Kafka (ai.anomalies.v1).

    producer.py --brokers 127.0.0.1:9092 --topic ai.anomalies.v1 --key producer.pem --count 100

The key is the producer's Ed25519 private key in PKCS#8 PEM (`cybermesh
keygen` writes one). Prints the id (hex) of each anomaly it published.
"""
import argparse
import time
import uuid

from confluent_kafka import Producer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cybermesh_wire import DOMAINS, ai_events, make_nonce, sha256, signed_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", default="127.0.0.1:9092")
    ap.add_argument("--topic", default="ai.anomalies.v1")
    ap.add_argument("--key", required=True)
    ap.add_argument("--count", type=int, default=10)
    args = ap.parse_args()

    with open(args.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    assert isinstance(key, Ed25519PrivateKey), "the key must be Ed25519"
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    producer = Producer({"bootstrap.servers": args.brokers, "acks": "all", "enable.idempotence": True})
    failed = []

    def delivered(err, _msg):
        if err is not None:
            failed.append(err)

    for i in range(args.count):
        payload = ai_events.AnomalyPayload(
            anomaly_type="ddos", severity=1 + i % 10, confidence=0.9, source=f"198.51.100.{i % 250}"
        ).SerializeToString()
        ts = int(time.time() * 1000)
        event_id = uuid.uuid4().bytes
        nonce = make_nonce(ts, pub)
        content_hash = sha256(payload)
        sig = key.sign(signed_bytes(DOMAINS["anomaly"], ts, nonce, event_id, content_hash))
        ev = ai_events.AnomalyEvent(
            id=event_id,
            payload=payload,
            content_hash=content_hash,
            nonce=nonce,
            timestamp_ms=ts,
            producer_pubkey=pub,
            signature=sig,
        )
        producer.produce(args.topic, ev.SerializeToString(), callback=delivered)
        producer.poll(0)
        print(event_id.hex(), flush=True)
    producer.flush(30)
    if failed:
        raise SystemExit(f"{len(failed)} messages not delivered: {failed[0]}")


if __name__ == "__main__":
    main()
