"""A small reference implementation of the version 1 hashes, from docs/verifying.md.

It is written from the published description alone and shares no code with
``audit_orm.hashing``: the test vectors in ``hashes-v1.json`` are checked against
both, so a change to either that alters a hash shows up as a disagreement with
the file, not as two implementations drifting together.

Run it as a script to print the vectors it computes from the inputs in the file
(``python -m tests.vectors.reference``); the file is fixed and only changes with
a new encoding version.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).with_name("hashes-v1.json")

VERSION = 0x01
#: The columns of a row, in encoding order, as the vector file names them.
ROW_FIELDS = (
    "id",
    "seq",
    "event_type",
    "entity_type",
    "entity_id",
    "actor",
    "data",
    "occurred_at",
    "recorded_at",
    "recommendation_id",
    "order_id",
    "ticker",
    "corrects_id",
)
ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)


def int64(value: int) -> bytes:
    """A signed 64-bit big-endian integer."""
    return value.to_bytes(8, "big", signed=True)


def int32(value: int) -> bytes:
    """A signed 32-bit big-endian integer."""
    return value.to_bytes(4, "big", signed=True)


def time_micros(text: str) -> int:
    """Whole microseconds from 2000-01-01T00:00:00Z to an ISO 8601 time with an offset."""
    moment = datetime.fromisoformat(text)
    if moment.utcoffset() is None:
        raise ValueError(f"{text!r} has no UTC offset")
    delta = moment - ORIGIN
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def uuid_bytes(text: str) -> bytes:
    """The 16 bytes of a UUID in its usual text form (RFC 9562 byte order)."""
    return uuid.UUID(text).bytes


def text_z(value: str) -> bytes:
    """UTF-8 text followed by one zero byte."""
    return value.encode("utf-8") + b"\x00"


def optional_uuid(value: str | None) -> bytes:
    """0x00 for a missing UUID, else 0x01 and its 16 bytes."""
    return b"\x00" if value is None else b"\x01" + uuid_bytes(value)


def versioned_sha256(encoding: bytes) -> bytes:
    """A version 1 hash: 0x01, then SHA-256 of the encoding (33 bytes)."""
    return bytes([VERSION]) + hashlib.sha256(encoding).digest()


def row_encoding(row: dict[str, Any]) -> bytes:
    """The version 1 encoding of a row given as in the vector file."""
    ticker = row["ticker"]
    return b"".join(
        [
            bytes([VERSION]),
            uuid_bytes(row["id"]),
            int64(row["seq"]),
            text_z(row["event_type"]),
            text_z(row["entity_type"]),
            uuid_bytes(row["entity_id"]),
            text_z(row["actor"]),
            text_z(row["data"]),
            int64(time_micros(row["occurred_at"])),
            int64(time_micros(row["recorded_at"])),
            optional_uuid(row["recommendation_id"]),
            optional_uuid(row["order_id"]),
            b"\x00" if ticker is None else b"\x01" + text_z(ticker),
            optional_uuid(row["corrects_id"]),
        ]
    )


def row_hash(row: dict[str, Any]) -> bytes:
    """The 33-byte row hash of a row given as in the vector file."""
    return versioned_sha256(row_encoding(row))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The version 1 Merkle root of row hashes in seq order."""
    if len(leaves) == 0:
        raise ValueError("no leaves")
    nodes = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]
    while len(nodes) != 1:
        parents = []
        for start in range(0, len(nodes), 2):
            pair = nodes[start : start + 2]
            if len(pair) == 2:
                parents.append(hashlib.sha256(b"\x01" + pair[0] + pair[1]).digest())
            else:
                parents.append(pair[0])  # an odd last node is carried up as it is
        nodes = parents
    return bytes([VERSION]) + nodes[0]


def generated_leaf(index: int) -> bytes:
    """Leaf ``index`` (from 0) of the Merkle vectors: 0x01 || SHA-256("leaf " || int64)."""
    return bytes([VERSION]) + hashlib.sha256(b"leaf " + int64(index)).digest()


def seal_encoding(seal: dict[str, Any]) -> bytes:
    """The version 1 encoding of a seal given as in the vector file."""
    parts = [
        bytes([VERSION]),
        int64(seal["seal_no"]),
        int64(seal["first_seq"]),
        int64(seal["last_seq"]),
        int64(seal["row_count"]),
        int32(len(seal["gaps"])),
    ]
    for low, high in seal["gaps"]:
        parts += [int64(low), int64(high)]
    parts.append(bytes.fromhex(seal["merkle_root"]))
    prev = seal["prev_hash"]
    parts.append(b"\x00" if prev is None else b"\x01" + bytes.fromhex(prev))
    parts += [
        int64(seal["horizon_txid"]),
        int64(time_micros(seal["cut_at"])),
        int64(time_micros(seal["sealed_at"])),
    ]
    return b"".join(parts)


def seal_hash(seal: dict[str, Any]) -> bytes:
    """The 33-byte seal hash of a seal given as in the vector file."""
    return versioned_sha256(seal_encoding(seal))


def digest_text(seal_no: int, hash_: bytes) -> str:
    """A digest as ``audit-orm digest`` prints it: the seal number, a colon, lowercase hex."""
    return f"{seal_no}:{hash_.hex()}"


def compute(vectors: dict[str, Any]) -> dict[str, Any]:
    """Every output of the vector file recomputed from its inputs."""
    out = json.loads(json.dumps(vectors))
    for case in out["times"]:
        case["micros"] = time_micros(case["time"])
    for case in out["rows"]:
        case["encoding"] = row_encoding(case["input"]).hex()
        case["row_hash"] = row_hash(case["input"]).hex()
    for case in out["merkle"]["cases"]:
        leaves = [generated_leaf(i) for i in range(case["count"])]
        if "leaves" in case:
            case["leaves"] = [leaf.hex() for leaf in leaves]
        case["root"] = merkle_root(leaves).hex()
    for case in out["seals"]:
        case["encoding"] = seal_encoding(case["input"]).hex()
        hash_ = seal_hash(case["input"])
        case["seal_hash"] = hash_.hex()
        case["digest"] = digest_text(case["input"]["seal_no"], hash_)
    return out


if __name__ == "__main__":
    json.dump(compute(json.loads(VECTORS.read_text())), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
