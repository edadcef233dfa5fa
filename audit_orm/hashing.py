"""Canonical encodings and hashes: row hashes, Merkle roots, seal hashes.

Everything here is pure Python with no database access, so a verifier can
recompute every hash without trusting code stored in the database (a superuser
can replace a trigger function; they cannot replace this module on the
verifier's machine). The database computes the same row hash at insert, in the
SQL function ``audit_event_row_hash`` installed by migration
``0003_append_only_sealing``; a test checks the two agree.

Row encoding, version 1 (every hash is the version byte followed by a SHA-256
digest, 33 bytes, so a later encoding can coexist with this one)::

    0x01                        encoding version
    id                          16 bytes (the UUID's bytes)
    seq                         8 bytes, big-endian signed
    event_type                  UTF-8, then 0x00
    entity_type                 UTF-8, then 0x00
    entity_id                   16 bytes
    actor                       UTF-8, then 0x00
    data                        UTF-8 of PostgreSQL's jsonb text output, then 0x00
    occurred_at                 8 bytes: microseconds since 2000-01-01 00:00 UTC
    recorded_at                 8 bytes: microseconds since 2000-01-01 00:00 UTC
    recommendation_id           0x00 if NULL, else 0x01 + 16 bytes
    order_id                    0x00 if NULL, else 0x01 + 16 bytes
    ticker                      0x00 if NULL, else 0x01 + UTF-8 + 0x00
    corrects_id                 0x00 if NULL, else 0x01 + 16 bytes

Text is NUL-terminated rather than length-prefixed: PostgreSQL text (and JSONB)
cannot hold NUL, and UTF-8 of any other character has no zero byte, so the
encoding stays unambiguous and the SQL side stays cheap. Times count from
PostgreSQL's own epoch, so a timestamp's binary form (``timestamptz_send``) is
its encoding as it stands, with no arithmetic on either side.

Merkle root, version 1: leaves are the rows' 33-byte hashes in ``seq`` order;
a leaf node is ``SHA-256(0x00 || row_hash)``, an inner node
``SHA-256(0x01 || left || right)``; each level pairs neighbours and an odd last
node moves up unchanged. The root is ``0x01 || top node``. The distinct leaf and
node prefixes keep a leaf from passing for an inner node; the tree's shape is
fixed by the row count, which the seal also records.

Seal encoding, version 1::

    0x01, seal_no, first_seq, last_seq, row_count     (8 bytes each)
    number of gap ranges                              4 bytes
    each gap range: low, high (inclusive)             8 bytes each
    merkle_root                                       33 bytes
    prev_hash                                         0x00, or 0x01 + 33 bytes
    horizon_txid, cut_at, sealed_at                   8 bytes each (times as for rows)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from hashlib import sha256

#: The current encoding version of row hashes, Merkle roots and seal hashes.
HASH_VERSION = 1
#: Length of every stored hash: a version byte and a SHA-256 digest.
HASH_LENGTH = 33

_V1 = b"\x01"
_NUL = b"\x00"
_ABSENT = b"\x00"
_PRESENT = b"\x01"
_LEAF = b"\x00"
_NODE = b"\x01"
_int8 = struct.Struct(">q").pack
_int4 = struct.Struct(">i").pack
#: The origin of encoded times: PostgreSQL's epoch.
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def micros(value: datetime) -> int:
    """Microseconds from 2000-01-01 00:00 UTC (:data:`EPOCH`) to a timezone-aware datetime."""
    return (value - EPOCH) // _MICRO


def encode_row_raw(
    id: bytes,
    seq: int,
    event_type: str,
    entity_type: str,
    entity_id: bytes,
    actor: str,
    data: str,
    occurred: bytes,
    recorded: bytes,
    recommendation_id: bytes | None,
    order_id: bytes | None,
    ticker: str | None,
    corrects_id: bytes | None,
) -> bytes:
    """The version 1 encoding of one row, times given as their 8 encoded bytes.

    This is the single implementation of the layout; :func:`encode_row` and the
    verifier both use it.
    """
    return b"%b%b%b%b\x00%b\x00%b%b\x00%b\x00%b%b%b%b%b%b" % (
        _V1,
        id,
        _int8(seq),
        event_type.encode(),
        entity_type.encode(),
        entity_id,
        actor.encode(),
        data.encode(),
        occurred,
        recorded,
        _ABSENT if recommendation_id is None else _PRESENT + recommendation_id,
        _ABSENT if order_id is None else _PRESENT + order_id,
        _ABSENT if ticker is None else _PRESENT + ticker.encode() + _NUL,
        _ABSENT if corrects_id is None else _PRESENT + corrects_id,
    )


def encode_row(
    id: bytes,
    seq: int,
    event_type: str,
    entity_type: str,
    entity_id: bytes,
    actor: str,
    data: str,
    occurred_us: int,
    recorded_us: int,
    recommendation_id: bytes | None,
    order_id: bytes | None,
    ticker: str | None,
    corrects_id: bytes | None,
) -> bytes:
    """The version 1 canonical encoding of one audit row (see the module notes).

    UUIDs are given as their 16 bytes, ``data`` as PostgreSQL's text of the
    stored JSONB, and times as microseconds since :data:`EPOCH` (:func:`micros`).
    """
    return encode_row_raw(
        id,
        seq,
        event_type,
        entity_type,
        entity_id,
        actor,
        data,
        _int8(occurred_us),
        _int8(recorded_us),
        recommendation_id,
        order_id,
        ticker,
        corrects_id,
    )


def digest_v1(encoding: bytes) -> bytes:
    """A version 1 hash: the version byte, then SHA-256 of ``encoding``."""
    return _V1 + sha256(encoding).digest()


def row_hash(
    id: bytes,
    seq: int,
    event_type: str,
    entity_type: str,
    entity_id: bytes,
    actor: str,
    data: str,
    occurred_us: int,
    recorded_us: int,
    recommendation_id: bytes | None,
    order_id: bytes | None,
    ticker: str | None,
    corrects_id: bytes | None,
) -> bytes:
    """The 33-byte version 1 hash of one row (arguments as for :func:`encode_row`)."""
    return digest_v1(
        encode_row(
            id,
            seq,
            event_type,
            entity_type,
            entity_id,
            actor,
            data,
            occurred_us,
            recorded_us,
            recommendation_id,
            order_id,
            ticker,
            corrects_id,
        )
    )


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The version 1 Merkle root over row hashes in ``seq`` order (at least one)."""
    if not leaves:
        raise ValueError("a Merkle root needs at least one leaf")
    level = [sha256(_LEAF + leaf).digest() for leaf in leaves]
    while len(level) > 1:
        paired = [
            sha256(_NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return _V1 + level[0]


def encode_seal(
    seal_no: int,
    first_seq: int,
    last_seq: int,
    row_count: int,
    gaps: Iterable[tuple[int, int]],
    merkle_root: bytes,
    prev_hash: bytes | None,
    horizon_txid: int,
    cut_at_us: int,
    sealed_at_us: int,
) -> bytes:
    """The version 1 canonical encoding of one seal (see the module notes).

    ``gaps`` are the inclusive ``(low, high)`` ranges of sequence numbers inside
    ``first_seq..last_seq`` that hold no row, in ascending order.
    """
    gap_list = list(gaps)
    parts = [
        _V1,
        _int8(seal_no),
        _int8(first_seq),
        _int8(last_seq),
        _int8(row_count),
        _int4(len(gap_list)),
    ]
    for low, high in gap_list:
        parts.append(_int8(low))
        parts.append(_int8(high))
    parts.append(merkle_root)
    parts.append(_ABSENT if prev_hash is None else _PRESENT + prev_hash)
    parts.append(_int8(horizon_txid))
    parts.append(_int8(cut_at_us))
    parts.append(_int8(sealed_at_us))
    return b"".join(parts)


def seal_hash(
    seal_no: int,
    first_seq: int,
    last_seq: int,
    row_count: int,
    gaps: Iterable[tuple[int, int]],
    merkle_root: bytes,
    prev_hash: bytes | None,
    horizon_txid: int,
    cut_at_us: int,
    sealed_at_us: int,
) -> bytes:
    """The 33-byte version 1 hash of one seal (arguments as for :func:`encode_seal`)."""
    return digest_v1(
        encode_seal(
            seal_no,
            first_seq,
            last_seq,
            row_count,
            gaps,
            merkle_root,
            prev_hash,
            horizon_txid,
            cut_at_us,
            sealed_at_us,
        )
    )
