"""The canonical encodings, Merkle roots and digests, without a database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from hashlib import sha256
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit_orm.errors import InvalidInputError
from audit_orm.hashing import (
    HASH_LENGTH,
    encode_row,
    encode_seal,
    merkle_root,
    micros,
    row_hash,
    seal_hash,
)
from audit_orm.sealing import Digest, _gaps_between

ID = uuid.UUID("0190f0c4-1f2e-7a3b-8c4d-5e6f7a8b9c0d").bytes
ENTITY = uuid.UUID("11111111-2222-3333-4444-555555555555").bytes


def _row(**changes: object) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        id=ID,
        seq=7,
        event_type="order.filled",
        entity_type="order",
        entity_id=ENTITY,
        actor="broker_service",
        data='{"ticker": "AAPL"}',
        occurred_us=1_700_000_000_000_000,
        recorded_us=1_700_000_000_000_001,
        recommendation_id=None,
        order_id=ENTITY,
        ticker="AAPL",
        corrects_id=None,
    )
    row.update(changes)
    return row


def test_row_hash_is_version_byte_and_sha256_of_the_encoding() -> None:
    row = _row()
    digest = row_hash(**row)
    assert len(digest) == HASH_LENGTH
    assert digest[0] == 1
    assert digest[1:] == sha256(encode_row(**row)).digest()


def test_encoding_layout_is_the_documented_one() -> None:
    encoded = encode_row(**_row(order_id=None, ticker=None))
    expected = (
        b"\x01"
        + ID
        + (7).to_bytes(8, "big")
        + b"order.filled\x00order\x00"
        + ENTITY
        + b"broker_service\x00"
        + b'{"ticker": "AAPL"}\x00'
        + (1_700_000_000_000_000).to_bytes(8, "big")
        + (1_700_000_000_000_001).to_bytes(8, "big")
        + b"\x00\x00\x00\x00"
    )
    assert encoded == expected


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 8},
        {"event_type": "order.rejected"},
        {"entity_type": "position"},
        {"entity_id": ID},
        {"actor": "broker_servic"},
        {"data": '{"ticker": "AAPM"}'},
        {"occurred_us": 1_700_000_000_000_001},
        {"recorded_us": 1_700_000_000_000_002},
        {"recommendation_id": ENTITY},
        {"order_id": None},
        {"ticker": None},
        {"ticker": ""},
        {"corrects_id": ID},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_field_changes_the_hash(change: dict[str, Any]) -> None:
    assert row_hash(**_row(**change)) != row_hash(**_row())


def test_text_boundaries_cannot_shift() -> None:
    # Moving characters from one text field to the next must change the encoding.
    one = encode_row(**_row(event_type="order.fill", entity_type="edorder"))
    two = encode_row(**_row(event_type="order.filled", entity_type="order"))
    assert one != two


def test_micros_counts_from_the_postgresql_epoch_in_utc() -> None:
    assert micros(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert micros(datetime(2000, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))) == 0
    assert micros(datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)) == -1
    unix_micros = 1_767_323_045_000_006
    assert micros(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == unix_micros - 946_684_800 * 10**6


def _leaf(n: int) -> bytes:
    return b"\x01" + sha256(n.to_bytes(4, "big")).digest()


def test_merkle_root_of_one_leaf() -> None:
    leaf = _leaf(1)
    assert merkle_root([leaf]) == b"\x01" + sha256(b"\x00" + leaf).digest()


def test_merkle_root_of_three_leaves_promotes_the_odd_one() -> None:
    a, b, c = (sha256(b"\x00" + _leaf(i)).digest() for i in range(3))
    ab = sha256(b"\x01" + a + b).digest()
    assert merkle_root([_leaf(i) for i in range(3)]) == b"\x01" + sha256(b"\x01" + ab + c).digest()


def test_merkle_root_needs_a_leaf() -> None:
    with pytest.raises(ValueError, match="at least one leaf"):
        merkle_root([])


@given(st.integers(min_value=1, max_value=40), st.data())
def test_merkle_root_sees_any_change(count: int, data: st.DataObject) -> None:
    leaves = [_leaf(i) for i in range(count)]
    root = merkle_root(leaves)
    index = data.draw(st.integers(min_value=0, max_value=count - 1))
    changed = list(leaves)
    changed[index] = _leaf(1000 + index)
    assert merkle_root(changed) != root
    assert merkle_root(leaves[:index] + leaves[index + 1 :] or [_leaf(999)]) != root
    if count > 1:
        swapped = list(leaves)
        swapped[0], swapped[-1] = swapped[-1], swapped[0]
        assert merkle_root(swapped) != root


def _seal(**changes: object) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        seal_no=3,
        first_seq=21,
        last_seq=40,
        row_count=18,
        gaps=[(25, 25), (31, 31)],
        merkle_root=_leaf(1),
        prev_hash=_leaf(2),
        horizon_txid=900,
        cut_at_us=10,
        sealed_at_us=20,
    )
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    "change",
    [
        {"seal_no": 4},
        {"first_seq": 20},
        {"last_seq": 41},
        {"row_count": 17},
        {"gaps": [(25, 26)]},
        {"gaps": [(25, 25)]},
        {"merkle_root": _leaf(3)},
        {"prev_hash": None},
        {"horizon_txid": 901},
        {"cut_at_us": 11},
        {"sealed_at_us": 21},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_seal_field_changes_the_seal_hash(change: dict[str, Any]) -> None:
    assert seal_hash(**_seal(**change)) != seal_hash(**_seal())


def test_seal_hash_is_version_byte_and_sha256() -> None:
    fields = _seal()
    assert seal_hash(**fields) == b"\x01" + sha256(encode_seal(**fields)).digest()


def test_gaps_between() -> None:
    assert _gaps_between([1, 2, 3], 1, 3) == []
    assert _gaps_between([2, 3, 7], 1, 9) == [(1, 1), (4, 6), (8, 9)]
    assert _gaps_between([5], 5, 5) == []


def test_digest_text_round_trip() -> None:
    value = Digest(_leaf(5), 12)
    assert str(value) == "12:" + _leaf(5).hex()
    assert Digest.parse(str(value)) == value
    assert Digest.parse(_leaf(5).hex().upper()) == Digest(_leaf(5), None)


@pytest.mark.parametrize("text", ["", "12:", "zz", "12:" + "ab" * 32, "x:" + "ab" * 33])
def test_digest_parse_refuses_garbage(text: str) -> None:
    with pytest.raises(InvalidInputError, match="digest"):
        Digest.parse(text)
