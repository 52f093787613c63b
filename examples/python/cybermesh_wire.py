"""The CyberMesh wire contract in Python, written from the README's
"Wire contract" section and the project's .proto files (compiled at import
time with grpcio-tools, so nothing generated is checked in)."""
import hashlib
import importlib
import os
import struct
import sys
import tempfile

from grpc_tools import protoc

_PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def _compile():
    out = tempfile.mkdtemp(prefix="cybermesh-pb-")
    files = [os.path.join("cybermesh", "v1", f) for f in ("ai_events.proto", "control_events.proto")]
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{_PROTO_ROOT}", f"-I{include}", f"--python_out={out}", *files])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {files}")
    sys.path.insert(0, out)
    return (
        importlib.import_module("cybermesh.v1.ai_events_pb2"),
        importlib.import_module("cybermesh.v1.control_events_pb2"),
    )


ai_events, control_events = _compile()

DOMAINS = {"anomaly": b"ai.anomaly.v1", "evidence": b"ai.evidence.v1", "policy": b"ai.policy.v1"}
COMMITS_DOMAIN = b"control.commits.v1"


def signed_bytes(domain: bytes, timestamp_ms: int, nonce: bytes, event_id: bytes, content_hash: bytes) -> bytes:
    """u8 len(domain) || domain || u64 BE timestamp_ms || nonce (16) || id (16) || content_hash (32)"""
    assert len(nonce) == 16 and len(event_id) == 16 and len(content_hash) == 32
    return bytes([len(domain)]) + domain + struct.pack(">Q", timestamp_ms) + nonce + event_id + content_hash


def make_nonce(timestamp_ms: int, producer_pubkey: bytes) -> bytes:
    """u64 BE timestamp_ms || first 4 bytes of the producer key || 4 random bytes"""
    return struct.pack(">Q", timestamp_ms) + producer_pubkey[:4] + os.urandom(4)


def commit_signed_bytes(e) -> bytes:
    """What a CommitEvent's signature covers (control_events.proto)."""
    return (
        bytes([len(COMMITS_DOMAIN)])
        + COMMITS_DOMAIN
        + struct.pack(">Q", e.height)
        + e.block_hash
        + e.state_root
        + struct.pack(">Q", e.timestamp_ms)
        + struct.pack(">I", e.tx_count)
    )


def commit_vote_bytes(view: int, height: int, value_digest: bytes, epoch: int = 0) -> bytes:
    """What each commit-certificate signature covers (a set change's epoch > 0 prefixes its domain)."""
    vote = b"pbft.commit" + struct.pack(">Q", view) + struct.pack(">Q", height) + value_digest
    return vote if epoch == 0 else b"cybermesh.epoch" + struct.pack(">Q", epoch) + vote


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()
