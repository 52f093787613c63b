#!/usr/bin/env python3
"""Example downstream consumer: reads CommitEvents (control.commits.v1) and
checks each one: the publishing validator's signature, and the commit
certificate (q distinct validators' commit votes for the height).

    commit_consumer.py --brokers 127.0.0.1:9092 --topic control.commits.v1 \
        --validators HEX,HEX,HEX,HEX --quorum 3 --expect ids.txt --timeout 120

Exits 0 once every anomaly id listed in --expect (hex, one per line) is in a
verified commit event; prints a JSON summary. Exits 1 on any event that does
not verify, on two different blocks at one height, or on timeout.
"""
import argparse
import json
import sys
import time
import uuid

from confluent_kafka import Consumer
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cybermesh_wire import commit_signed_bytes, commit_vote_bytes, control_events


def valid(pub: bytes, sig: bytes, msg: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
        return True
    except (InvalidSignature, ValueError):
        return False


def check(e, validators, quorum):
    if e.public_key not in validators:
        return "published by a key outside the validator set"
    if not valid(e.public_key, e.signature, commit_signed_bytes(e)):
        return "bad publisher signature"
    c = e.certificate
    if c.height != e.height or c.block_hash != e.block_hash:
        return "certificate is for another block"
    msg = commit_vote_bytes(c.view, c.height, c.value_digest, c.epoch)
    signers = {s.public_key for s in c.signatures if s.public_key in validators and valid(s.public_key, s.signature, msg)}
    if len(signers) < quorum:
        return f"{len(signers)} valid commit signatures, {quorum} needed"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", default="127.0.0.1:9092")
    ap.add_argument("--topic", default="control.commits.v1")
    ap.add_argument("--validators", required=True, help="comma-separated hex Ed25519 keys")
    ap.add_argument("--quorum", type=int, required=True)
    ap.add_argument("--expect", required=True)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()

    validators = {bytes.fromhex(v) for v in args.validators.split(",")}
    with open(args.expect) as f:
        want = {line.strip() for line in f if line.strip()}
    c = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": f"commit-consumer-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "topic.metadata.refresh.interval.ms": 500,
        }
    )
    c.subscribe([args.topic])
    blocks = {}  # height -> block hash
    publishers = {}  # height -> set of publishing keys
    seen = set()
    deadline = time.time() + args.timeout
    while not want <= seen:
        if time.time() > deadline:
            print(json.dumps({"error": "timeout", "missing": len(want - seen)}))
            return 1
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        e = control_events.CommitEvent()
        e.ParseFromString(m.value())
        if m.key() != str(e.height).encode():
            print(json.dumps({"error": "event not keyed by its height", "height": e.height}))
            return 1
        problem = check(e, validators, args.quorum)
        if problem:
            print(json.dumps({"error": problem, "height": e.height}))
            return 1
        if blocks.setdefault(e.height, e.block_hash) != e.block_hash:
            print(json.dumps({"error": "two blocks at one height", "height": e.height}))
            return 1
        publishers.setdefault(e.height, set()).add(e.public_key)
        seen.update(i.hex() for i in e.anomaly_ids)
    c.close()
    print(json.dumps({
        "verified_heights": len(blocks),
        "anomalies": len(seen & want),
        "max_publishers_per_height": max(len(p) for p in publishers.values()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
