"""The published test vectors against PostgreSQL: what the database stores hashes as published.

The row hash is computed by the database at insert; a verifier recomputes it
from the rows as PostgreSQL prints them. These tests tie the file
``tests/vectors/hashes-v1.json`` to the server: its SQL hash function gives the
published hashes, and rows written through the repository store the published
JSONB text and a hash that the independent reference recomputes, with seals that
the reference recomputes too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository, digest, seal, verify
from tests.vectors import reference

VECTORS: dict[str, Any] = json.loads(reference.VECTORS.read_text(encoding="utf-8"))
ROWS = VECTORS["rows"]

# The columns as a verifier reads them: text as stored, the JSONB as PostgreSQL
# prints it, times in ISO 8601 with microseconds and a UTC offset.
_ROW_QUERY = text(
    "SELECT id::text AS id, seq, event_type, entity_type, entity_id::text AS entity_id, actor, "
    "data::text AS data, "
    "to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') "
    "AS occurred_at, "
    "to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') "
    "AS recorded_at, "
    "recommendation_id::text AS recommendation_id, order_id::text AS order_id, ticker, "
    "corrects_id::text AS corrects_id, row_hash FROM audit_events ORDER BY seq"
)

_SEAL_QUERY = text(
    "SELECT seal_no, first_seq, last_seq, row_count, "
    "COALESCE((SELECT json_agg(json_build_array(lower(r), upper(r) - 1) ORDER BY lower(r)) "
    "          FROM unnest(gaps) AS r), '[]')::text AS gaps, "
    "encode(merkle_root, 'hex') AS merkle_root, encode(prev_hash, 'hex') AS prev_hash, "
    "seal_hash, horizon_txid::text::bigint AS horizon_txid, "
    "to_char(cut_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') AS cut_at, "
    "to_char(sealed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') AS sealed_at "
    "FROM audit_seals ORDER BY seal_no"
)


# The queries docs/verifying.md gives an outside verifier, run as written there.
_DOC_QUERIES = re.findall(
    r"```sql\n(.*?)```",
    (Path(__file__).parents[2] / "docs" / "verifying.md").read_text(encoding="utf-8"),
    re.DOTALL,
)


def _optional(value: bytes | None) -> bytes:
    return b"\x00" if value is None else b"\x01" + value


@pytest.mark.parametrize("case", ROWS, ids=lambda case: case["name"])
async def test_sql_row_hash_function_gives_the_published_hash(
    session: AsyncSession, case: dict[str, Any]
) -> None:
    """The database's own row hash of the vector's columns is the published hash.

    The trigger hashes every insert with this function, so a change to its SQL
    (or to how the server encodes a type) that alters a hash fails here.
    """
    row = case["input"]
    computed = await session.scalar(
        text(
            "SELECT audit_event_row_hash(CAST(:id AS uuid), :seq, :event_type, :entity_type, "
            "CAST(:entity_id AS uuid), :actor, CAST(:data AS jsonb), "
            "CAST(CAST(:occurred_at AS text) AS timestamptz), "
            "CAST(CAST(:recorded_at AS text) AS timestamptz), "
            "CAST(:recommendation_id AS uuid), CAST(:order_id AS uuid), :ticker, "
            "CAST(:corrects_id AS uuid))"
        ),
        {name: row[name] for name in reference.ROW_FIELDS},
    )
    assert computed is not None
    assert bytes(computed).hex() == case["row_hash"]
    printed = await session.scalar(text("SELECT CAST(:data AS jsonb)::text"), {"data": row["data"]})
    assert printed == row["data"]


async def _record(repo: AuditRepository, case: dict[str, Any]) -> None:
    row = case["input"]
    explicit = {}
    if row["entity_type"] != "recommendation" and "recommendation_id" not in case["payload"]:
        explicit["recommendation_id"] = row["recommendation_id"]
    await repo.record(
        row["event_type"],
        row["entity_type"],
        row["entity_id"],
        case["payload"],
        actor=row["actor"],
        occurred_at=row["occurred_at"],
        event_id=row["id"],
        corrects=row["corrects_id"],
        **explicit,
    )


async def test_rows_written_through_the_database_hash_as_published(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Rows recorded through the repository store the published JSONB text and hash.

    The database picks seq and recorded_at, so those two come from the stored row;
    every other column must be the vector's, and the stored hash must be the
    reference's hash of the row as read back (and equal to the published hash
    once seq and recorded_at are the vector's). Then seal: the reference
    recomputes each seal's Merkle root and hash from the stored seals alone,
    including a gap left by a rolled-back insert, and verify agrees.
    """
    _, engine = fresh_db
    async with AsyncSession(engine) as session:
        for case in ROWS[:3]:
            await _record(AuditRepository(session), case)
        await session.commit()
        # A rolled-back insert leaves a gap in seq that the seal must record.
        await _record(AuditRepository(session), ROWS[3])
        await session.rollback()
        for case in ROWS[3:]:
            await _record(AuditRepository(session), case)
        await session.commit()

    async with engine.connect() as conn:
        stored = [dict(row) for row in (await conn.execute(_ROW_QUERY)).mappings()]
    assert [row["id"] for row in stored] == [case["input"]["id"] for case in ROWS]
    hashes = []
    for case, row in zip(ROWS, stored, strict=True):
        expected = case["input"]
        for name in reference.ROW_FIELDS:
            if name in ("seq", "recorded_at", "occurred_at"):
                continue
            assert row[name] == expected[name], (case["name"], name)
        assert reference.time_micros(row["occurred_at"]) == expected["occurred_us"]
        stored_hash = bytes(row.pop("row_hash"))
        assert reference.row_hash(row) == stored_hash
        as_published = {**row, "seq": expected["seq"], "recorded_at": expected["recorded_at"]}
        assert reference.row_hash(as_published).hex() == case["row_hash"]
        hashes.append(stored_hash)
    assert [row["seq"] for row in stored] == [1, 2, 3, 5, 6, 7, 8]

    await _check_documented_queries(engine, hashes)

    result = await seal(engine, block_size=4)
    assert result.rows_sealed == len(ROWS)
    async with engine.connect() as conn:
        seals = [dict(row) for row in (await conn.execute(_SEAL_QUERY)).mappings()]
    assert len(seals) == 2
    # Blocks of four rows: seq 1, 2, 3, 5 (4 rolled back) then 6, 7, 8.
    assert [json.loads(row["gaps"]) for row in seals] == [[[4, 4]], []]
    previous = None
    taken = 0
    for stored_seal in seals:
        stored_seal["gaps"] = json.loads(stored_seal["gaps"])
        sealed_hash = bytes(stored_seal.pop("seal_hash"))
        count = stored_seal["row_count"]
        root = reference.merkle_root(hashes[taken : taken + count])
        taken += count
        assert root.hex() == stored_seal["merkle_root"]
        assert stored_seal["prev_hash"] == previous
        assert reference.seal_hash(stored_seal) == sealed_hash
        previous = sealed_hash.hex()
    assert taken == len(ROWS)
    head = seals[-1]
    kept = await digest(engine)
    assert str(kept) == reference.digest_text(head["seal_no"], bytes.fromhex(previous or ""))
    await _check_documented_seal_query(engine)
    report = await verify(engine, digest=kept)
    assert report.ok, report.first_problem


async def _check_documented_queries(engine: AsyncEngine, hashes: list[bytes]) -> None:
    """The documented row query gives bytes that encode, as documented, to the stored hashes."""
    assert len(_DOC_QUERIES) == 2
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql(_DOC_QUERIES[0])).all()
    found = []
    for row in rows:
        encoding = b"".join(
            [
                b"\x01",
                row[0],
                reference.int64(row[1]),
                reference.text_z(row[2]),
                reference.text_z(row[3]),
                row[4],
                reference.text_z(row[5]),
                reference.text_z(row[6]),
                row[7],
                row[8],
                _optional(row[9]),
                _optional(row[10]),
                _optional(None if row[11] is None else reference.text_z(row[11])),
                _optional(row[12]),
            ]
        )
        assert reference.versioned_sha256(encoding) == row[13]
        found.append(bytes(row[13]))
    assert found == hashes


async def _check_documented_seal_query(engine: AsyncEngine) -> None:
    """The documented seal query gives fields that encode, as documented, to the stored hashes."""
    async with engine.connect() as conn:
        seals = (await conn.exec_driver_sql(_DOC_QUERIES[1])).all()
    assert seals
    for seal_row in seals:
        fields = {
            "seal_no": seal_row[0],
            "first_seq": seal_row[1],
            "last_seq": seal_row[2],
            "row_count": seal_row[3],
            "gaps": [list(pair) for pair in seal_row[4]],
            "merkle_root": seal_row[5].hex(),
            "prev_hash": None if seal_row[6] is None else seal_row[6].hex(),
            "horizon_txid": seal_row[8],
        }
        encoding = reference.seal_encoding({**fields, "cut_at": _EPOCH, "sealed_at": _EPOCH})
        # The two times are the last 16 bytes; the query gives them already encoded.
        encoding = encoding[:-16] + seal_row[9] + seal_row[10]
        assert reference.versioned_sha256(encoding) == seal_row[7]


_EPOCH = "2000-01-01T00:00:00+00:00"
