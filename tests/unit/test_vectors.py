"""The published test vectors (tests/vectors/hashes-v1.json) against both implementations.

The file fixes inputs and the expected bytes of every version 1 encoding: times,
row encodings and hashes, Merkle roots and seal hashes. ``audit_orm.hashing``
and the independent reference in ``tests/vectors/reference.py`` must each give
exactly the file's values, so a change to the encoding cannot pass by changing
the code that makes a hash and the code that checks it together.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest

from audit_orm.hashing import (
    HASH_LENGTH,
    encode_row,
    encode_row_raw,
    encode_seal,
    merkle_root,
    micros,
    row_hash,
    seal_hash,
)
from audit_orm.jsonb import dumps_exact
from audit_orm.payloads import payload_to_data, validate_payload
from audit_orm.sealing import Digest, SealInfo
from tests.vectors import reference

VECTORS: dict[str, Any] = json.loads(reference.VECTORS.read_text(encoding="utf-8"))
ROWS = VECTORS["rows"]
SEALS = VECTORS["seals"]
MERKLE = VECTORS["merkle"]["cases"]


def _uuid(text: str | None) -> bytes | None:
    return None if text is None else UUID(text).bytes


def _row_args(row: dict[str, Any]) -> dict[str, Any]:
    """The vector's row as the arguments of :func:`audit_orm.hashing.encode_row`."""
    return dict(
        id=UUID(row["id"]).bytes,
        seq=row["seq"],
        event_type=row["event_type"],
        entity_type=row["entity_type"],
        entity_id=UUID(row["entity_id"]).bytes,
        actor=row["actor"],
        data=row["data"],
        occurred_us=micros(datetime.fromisoformat(row["occurred_at"])),
        recorded_us=micros(datetime.fromisoformat(row["recorded_at"])),
        recommendation_id=_uuid(row["recommendation_id"]),
        order_id=_uuid(row["order_id"]),
        ticker=row["ticker"],
        corrects_id=_uuid(row["corrects_id"]),
    )


def _seal_args(seal: dict[str, Any]) -> dict[str, Any]:
    return dict(
        seal_no=seal["seal_no"],
        first_seq=seal["first_seq"],
        last_seq=seal["last_seq"],
        row_count=seal["row_count"],
        gaps=[(low, high) for low, high in seal["gaps"]],
        merkle_root=bytes.fromhex(seal["merkle_root"]),
        prev_hash=None if seal["prev_hash"] is None else bytes.fromhex(seal["prev_hash"]),
        horizon_txid=seal["horizon_txid"],
        cut_at_us=micros(datetime.fromisoformat(seal["cut_at"])),
        sealed_at_us=micros(datetime.fromisoformat(seal["sealed_at"])),
    )


def test_reference_reproduces_every_output_of_the_file() -> None:
    """The reference, written from the description alone, gives every published value.

    Guards the file itself: a value edited by hand (or produced by a changed
    audit_orm) no longer matches what the description says.
    """
    assert reference.compute(VECTORS) == VECTORS


def test_the_file_covers_the_cases_an_outside_verifier_needs() -> None:
    """Odd and even Merkle counts including 1, 2, 3 and 1000; absent and present optionals."""
    counts = {case["count"] for case in MERKLE}
    assert {1, 2, 3, 4, 5, 7, 9, 17, 1000, 1001} <= counts
    optional = ("recommendation_id", "order_id", "ticker", "corrects_id")
    assert any(all(case["input"][name] is None for name in optional) for case in ROWS)
    assert any(all(case["input"][name] is not None for name in optional) for case in ROWS)
    assert any(case["input"]["gaps"] for case in SEALS)
    assert any(case["input"]["prev_hash"] is None for case in SEALS)


@pytest.mark.parametrize("case", VECTORS["times"], ids=lambda case: case["time"])
def test_times_encode_as_published(case: dict[str, Any]) -> None:
    """Times count microseconds from 2000-01-01 UTC, negative before it, offsets applied."""
    assert micros(datetime.fromisoformat(case["time"])) == case["micros"]


@pytest.mark.parametrize("case", ROWS, ids=lambda case: case["name"])
def test_row_encoding_and_hash_match_the_vectors(case: dict[str, Any]) -> None:
    """audit_orm's row encoding and hash are byte for byte the published ones."""
    row = case["input"]
    args = _row_args(row)
    assert args["occurred_us"] == row["occurred_us"]
    assert args["recorded_us"] == row["recorded_us"]
    assert encode_row(**args).hex() == case["encoding"]
    assert row_hash(**args).hex() == case["row_hash"]
    assert len(bytes.fromhex(case["row_hash"])) == HASH_LENGTH


@pytest.mark.parametrize("case", ROWS, ids=lambda case: case["name"])
def test_verifier_encoding_from_raw_times_matches_the_vectors(case: dict[str, Any]) -> None:
    """The path verify uses (times as their 8 stored bytes) gives the same encoding."""
    args = _row_args(case["input"])
    occurred = args.pop("occurred_us").to_bytes(8, "big", signed=True)
    recorded = args.pop("recorded_us").to_bytes(8, "big", signed=True)
    assert encode_row_raw(**args, occurred=occurred, recorded=recorded).hex() == case["encoding"]


@pytest.mark.parametrize("case", ROWS, ids=lambda case: case["name"])
def test_row_payload_is_the_published_json(case: dict[str, Any]) -> None:
    """The payload given, validated and stored, is the JSON the vector's ``data`` holds.

    ``data`` is PostgreSQL's text of the stored JSONB (key order and spacing are
    the server's); here the values must agree exactly, numbers as exact decimals.
    """
    row = case["input"]
    stored = dumps_exact(payload_to_data(validate_payload(row["event_type"], case["payload"])))
    assert json.loads(stored, parse_float=Decimal) == json.loads(row["data"], parse_float=Decimal)


@pytest.mark.parametrize("case", MERKLE, ids=lambda case: f"{case['count']}-leaves")
def test_merkle_roots_match_the_vectors(case: dict[str, Any]) -> None:
    """Merkle roots over 1..9, 16, 17, 1000 and 1001 leaves, odd last nodes carried up."""
    leaves = [reference.generated_leaf(index) for index in range(case["count"])]
    if "leaves" in case:
        assert [leaf.hex() for leaf in leaves] == case["leaves"]
    assert merkle_root(leaves).hex() == case["root"]


def test_merkle_root_of_no_leaves_is_refused() -> None:
    """A seal always holds a row: an empty tree has no root in either implementation."""
    with pytest.raises(ValueError, match=r"^a Merkle root needs at least one leaf$"):
        merkle_root([])
    with pytest.raises(ValueError, match="no leaves"):
        reference.merkle_root([])


@pytest.mark.parametrize("case", SEALS, ids=lambda case: case["name"])
def test_seal_encoding_hash_and_digest_match_the_vectors(case: dict[str, Any]) -> None:
    """audit_orm's seal encoding, hash and digest text are the published ones."""
    args = _seal_args(case["input"])
    assert args["cut_at_us"] == case["input"]["cut_at_us"]
    assert args["sealed_at_us"] == case["input"]["sealed_at_us"]
    assert encode_seal(**args).hex() == case["encoding"]
    hash_ = seal_hash(**args)
    assert hash_.hex() == case["seal_hash"]
    assert str(Digest(hash_, case["input"]["seal_no"])) == case["digest"]
    assert Digest.parse(case["digest"]) == Digest(hash_, case["input"]["seal_no"])
    info = SealInfo(
        seal_no=args["seal_no"],
        first_seq=args["first_seq"],
        last_seq=args["last_seq"],
        row_count=args["row_count"],
        gaps=tuple(args["gaps"]),
        merkle_root=args["merkle_root"],
        prev_hash=args["prev_hash"],
        seal_hash=hash_,
        horizon_txid=args["horizon_txid"],
        cut_at=datetime.fromisoformat(case["input"]["cut_at"]),
        sealed_at=datetime.fromisoformat(case["input"]["sealed_at"]),
    )
    assert info.computed_hash() == hash_
    assert info.digest == Digest.parse(case["digest"])


def test_seals_chain_over_the_row_vectors() -> None:
    """Each seal's root is the Merkle root of its rows' published hashes, and links to the last.

    So the file is one small, consistent sealed trail a verifier can walk end to end.
    """
    hashes = {case["name"]: bytes.fromhex(case["row_hash"]) for case in ROWS}
    seqs = {case["name"]: case["input"]["seq"] for case in ROWS}
    previous = None
    for case in SEALS:
        seal = case["input"]
        assert merkle_root([hashes[name] for name in case["rows"]]).hex() == seal["merkle_root"]
        assert seal["prev_hash"] == previous
        assert seal["row_count"] == len(case["rows"])
        held = [seqs[name] for name in case["rows"]]
        assert held == sorted(held)
        assert held[-1] == seal["last_seq"]
        in_gaps = sum(high - low + 1 for low, high in seal["gaps"])
        assert seal["last_seq"] - seal["first_seq"] + 1 == seal["row_count"] + in_gaps
        previous = case["seal_hash"]
